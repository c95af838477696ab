"""``%train``: run an experiment's ``train.py`` as a supervised child process.

What one call does, in order:

1. **Preflight** (:mod:`colabkit.preflight`; each failure is a :class:`~colabkit.errors.PreflightError` that says what to do): the
   experiment and its ``train.py`` exist; the GPU's memory tier (an L4-class GPU is Tier 1, where a job is
   capped at 20 GB; a larger ``--max-vram`` is refused with the advice to move to Tier 2); free disk against
   ``train.min_free_disk``; ``train.data_paths`` on a network/FUSE mount (a warning: pre-fetch to local disk);
   write access to every sync tier; the checkpoint to resume from.
2. ``pip freeze`` (:mod:`colabkit.freeze`, taken as the run starts, beside the first attempt) into ``frozen_requirements.txt`` in the
   run's log folder ``experiments/vXX/logs/<run id>/``, beside one log per attempt (``<run id>.attempt1.log``) and ``run.json``
   (host, GPU, attempts, exit codes, last step; ``%airlock import`` reads it).
3. Background sync of the checkpoint and log folders (``colabkit.sync``), flushed when the run ends.
4. The child (:class:`colabkit.launch.Child`): its own process group, output streamed line by line to the caller (the cell, the terminal) and
   to the attempt's log; each line read once by a :class:`colabkit.progress.LineFeed` (parsed by
   :mod:`colabkit.events`), whose events go to the progress (step, loss, rate, ETA, last checkpoint) and to
   every listener (triggers, the dashboard). The child runs a small bootstrap before ``train.py`` that caps its GPU memory
   (``torch.cuda.set_per_process_memory_fraction`` from ``COLABKIT_MAX_VRAM``), so an oversize job fails
   fast instead of taking the whole GPU.
5. On a non-zero exit: restart from the newest local checkpoint, up to ``max_restarts`` times, with
   exponential back-off, except after running out of memory (CUDA OOM text, ``MemoryError``, killed by the
   kernel's OOM killer), which fails at once with :class:`~colabkit.errors.OutOfMemoryError` and the tier
   advice. A child that prints nothing and saves no checkpoint for ``stall_after`` is killed and restarted.

Stopping (``Job.stop()``, ``%train stop``, or Ctrl-C / interrupting the kernel in the foreground) sends
SIGTERM to the child's process group, SIGKILL after ``grace``, then flushes sync.

Example:
    >>> result = train("v01", args=["--steps", "300"], on_line=print)     # foreground
    >>> job = train("v01", background=True); job.status()["step"]         # background
    >>> job.stop()
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import ColabkitError, ConfigError, OutOfMemoryError, PreflightError, TrainError
from .freeze import Freeze
from .fsutil import atomic_write_json, atomic_write_text
from .launch import Child, Launch
from .preflight import Preflight, _check_name, oom_advice, preflight
from .progress import TAIL_KEPT, LineFeed, Listener, Progress
from .runtime import cli_form, command

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

FORMAT = 1
#: how many of the last log lines an error message shows
TAIL_LINES = 15
#: the longest back-off between two attempts, in seconds (the first is train.restart_backoff)
MAX_BACKOFF = 600.0
#: the job file of a running job is refreshed at most this often (seconds) while lines stream
JOB_FILE_INTERVAL = 2.0

_STEPS_ARG = re.compile(r"^--(?:steps|total[-_]steps|max[-_]steps|num[-_]steps|iters|max[-_]iters)(?:=(\d+))?$")

# Runs in the child before train.py: caps GPU memory, then runs the script as `python train.py` would.
BOOTSTRAP = r"""
import os, runpy, sys
def _colabkit_cap():
    cap = os.environ.get("COLABKIT_MAX_VRAM")
    if not cap:
        return
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    cap = int(cap)
    for i in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(i).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), i)
    print(f"colabkit: GPU memory capped at {cap / 1e9:.1f} GB per device (COLABKIT_MAX_VRAM)", flush=True)
_colabkit_cap()
del _colabkit_cap
_script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(_script))
runpy.run_path(_script, run_name="__main__")
"""


# -- records -----------------------------------------------------------------------------------------
@dataclass
class Attempt:
    """One start of the child process.

    Attributes:
        number: 1 for the first start, 2 for the first restart, ...
        log: the attempt's log file.
        exit_code: the child's return code (negative: killed by that signal); None while running.
        outcome: ``running``, ``finished``, ``crashed``, ``oom``, ``stalled`` or ``stopped``.
        resume_from: the checkpoint it was started from (None: a fresh start).
        last_step: the last step it reported.
    """

    number: int
    log: str
    started: float
    resume_from: str | None = None
    pid: int | None = None
    ended: float | None = None
    exit_code: int | None = None
    outcome: str = "running"
    detail: str | None = None
    first_step: int | None = None
    last_step: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What a finished (or failed, or stopped) run did.

    Attributes:
        state: ``finished``, ``failed``, ``oom`` or ``stopped``.
        exit_code: the last attempt's return code.
        attempts: every :class:`Attempt`, in order.
        step / total_steps / loss: the last progress seen.
        log_dir: the run's log folder (attempt logs, run.json, frozen_requirements.txt).
        warnings: preflight and progress warnings (network data paths, estimate off by more than half).
        last_lines: the last lines the child printed.
    """

    experiment: str
    run_id: str
    state: str
    exit_code: int | None
    attempts: list[Attempt]
    step: int | None
    total_steps: int | None
    loss: float | None
    log_dir: Path
    last_checkpoint: str | None = None
    warnings: list[str] = field(default_factory=list)
    last_lines: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state == "finished"

    @property
    def restarts(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def log(self) -> Path | None:
        """The last attempt's log file."""
        return Path(self.attempts[-1].log) if self.attempts else None

    def as_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "run_id": self.run_id, "state": self.state, "ok": self.ok,
                "exit_code": self.exit_code, "attempts": [a.as_dict() for a in self.attempts],
                "restarts": self.restarts, "step": self.step, "total_steps": self.total_steps, "loss": self.loss,
                "log_dir": str(self.log_dir), "log": str(self.log) if self.log else None,
                "last_checkpoint": self.last_checkpoint, "warnings": list(self.warnings),
                "last_lines": list(self.last_lines), "elapsed": self.elapsed}


# -- preflight ------------------------------------------------------------------------------------------
def _total_from_args(args: Sequence[str]) -> int | None:
    for i, a in enumerate(args):
        m = _STEPS_ARG.match(a)
        if not m:
            continue
        v = m.group(1) if m.group(1) else (args[i + 1] if i + 1 < len(args) else None)
        if v is not None and str(v).isdigit() and int(v) > 0:
            return int(v)
    return None


def _stamp(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t if t is not None else time.time()))


def _sigterm_as_interrupt() -> Callable[[], None] | None:
    """While a foreground run lasts, SIGTERM (a VM shutting down, `kill PID`) stops it as Ctrl-C does: the child
    is stopped and sync flushed instead of the child being orphaned. Returns the function that restores the
    previous handler (None outside the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    prev = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise KeyboardInterrupt("SIGTERM")
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, prev)
    return restore


# -- the job ---------------------------------------------------------------------------------------------
_jobs: dict[str, "Job"] = {}
_jobs_lock = threading.Lock()
_atexit_installed = False


class Job:
    """A supervised training run (foreground or background).

    Create it with :func:`train`. In the background a thread named ``colabkit-train-<experiment>`` pumps the
    child's output into the log and the progress state; :meth:`stop` ends the child and joins that thread.

    Attributes:
        experiment, run_id, log_dir: what and where.
        progress: the :class:`Progress` read from the log lines.
        attempts: the :class:`Attempt` records so far.
        state: ``starting``, ``running``, ``waiting`` (back-off before a restart), ``stopping``, then
            ``finished``, ``failed``, ``oom`` or ``stopped``.
    """

    def __init__(self, experiment: str, *, config: "Config", pre: Preflight, args: Sequence[str] = (),
                 max_restarts: int, resume_from: str | None, restart_backoff: float, stall_after: float,
                 grace: float, estimate: float | None, total_steps: int | None, sync: bool,
                 on_line: Callable[[str], None] | None, on_warning: Callable[[str], None] | None,
                 python: str | None = None, resume_policy: str = "auto",
                 listeners: Sequence[Listener] = (), output_dir: str | os.PathLike | None = None,
                 name: str | None = None, run: str | None = None, launch: Launch | None = None) -> None:
        self.experiment = experiment
        #: one process, or a torchrun group of ranks supervised as one job (see :mod:`colabkit.launch`)
        self.launch = launch or Launch()
        #: the job's name in the registry and its job file: the experiment, or e.g. ``v01.cooldown_200``
        self.key = name or experiment
        #: the run's stable identity for triggers: ``main``, or a cooldown's folder name
        self.run_name = run or "main"
        self.config = config
        self.pre = pre
        self.args = [str(a) for a in args]
        self.max_restarts = max_restarts
        self.initial_resume = resume_from
        self.resume_policy = resume_policy
        self.restart_backoff = restart_backoff
        self.stall_after = stall_after
        self.grace = grace
        self.estimate = estimate
        self.sync_enabled = sync
        self.on_warning = on_warning
        # the child's own messages (a Checkpointer's errors) name commands as the user types them here
        self.command_form = "magic" if command("train").startswith("%") else "cli"
        self.python = python or sys.executable
        self.started = time.time()
        self.run_id = f"{experiment}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(self.started))}-{uuid.uuid4().hex[:4]}"
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if self.output_dir is not None:  # a run of its own folder (a cooldown): never the main run's folders
            self.log_dir = self.output_dir / config.logs / self.run_id
            self.checkpoint_dir = self.output_dir / config.checkpoints
        else:
            self.log_dir = config.log_dir(experiment) / self.run_id
            self.checkpoint_dir = config.checkpoint_dir(experiment)
        self.cwd = pre.experiment_dir
        self.progress = Progress(total_steps=total_steps or _total_from_args(self.args) or config.train.total_steps,
                                 history=_prior_history(self.job_file, resume_from))
        #: the one reader of the child's lines: parsed once, the events to the progress and every listener
        self.feed = LineFeed(config, self.progress, listeners=listeners, on_line=on_line, base=self.cwd,
                             distributed=self.launch.distributed, experiment=experiment)
        self.attempts: list[Attempt] = []
        self.warnings: list[str] = list(pre.warnings)
        self.state = "starting"
        self.result: TrainResult | None = None
        self.error: BaseException | None = None
        self.background = False
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._child: Child | None = None   # the current attempt's process (or torchrun group)
        self._thread: threading.Thread | None = None
        self._interrupted = False
        self._estimate_checked = False
        self._job_file_written = 0.0
        self._sync: Any = None   # a colabkit.sync.RunSync while sync runs for this run
        self._freeze = Freeze(self.log_dir, python=self.python, warn=lambda t: self._warn(f"{experiment}: {t}"))
        self._stop_file = config.state_dir / "jobs" / f"{self.key}.stop"

    # -- public ----------------------------------------------------------------------------------------
    @property
    def listeners(self) -> list[Listener]:
        """Called with (events, line, attempt) for every line the child prints, and with a ``state`` event
        (finished, failed, oom, stalled, restarted, stopped) when the run changes state; append to add one."""
        return self.feed.listeners

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    @property
    def ranks(self) -> set[int]:
        """The pids of the current attempt's ranks under torchrun (empty for one process)."""
        with self._lock:
            child = self._child
        return set(child.ranks) if child is not None else set()

    @property
    def job_file(self) -> Path:
        return self.config.state_dir / "jobs" / f"{self.key}.json"

    def status(self) -> dict[str, Any]:
        """A snapshot: state, attempt, step, total, loss, rate (steps/s), ETA (s), log, checkpoint."""
        with self._lock:
            att = self.attempts[-1] if self.attempts else None
            d = {"experiment": self.experiment, "key": self.key, "run_id": self.run_id, "state": self.state,
                 "attempt": att.number if att else None, "restarts": max(0, len(self.attempts) - 1),
                 "max_restarts": self.max_restarts, "pid": os.getpid(),
                 "child_pid": self._child.pid if self._child is not None else None,
                 "log": att.log if att else None, "log_dir": str(self.log_dir), "started": self.started,
                 "elapsed": time.time() - self.started, "background": self.background, "host": socket.gethostname(),
                 "estimate": self.estimate, "warnings": list(self.warnings), "data": dict(self.pre.data),
                 "launch": self.launch.as_dict()}
        d.update(self.progress.as_dict())
        if self.error is not None:
            d["error"] = str(self.error)
        return d

    def logs(self, n: int = 50) -> list[str]:
        """The last `n` lines the child printed (newest last; 0: the whole current attempt's log)."""
        lines = self.feed.last()
        with self._lock:
            log_path = self.attempts[-1].log if self.attempts else None
        if (n == 0 or n > len(lines)) and log_path and len(lines) == TAIL_KEPT:
            with contextlib.suppress(OSError):
                with open(log_path, "r", encoding="utf-8", errors="replace") as f:
                    return [x.rstrip("\n") for x in deque(f, maxlen=n or None)]
        return lines[-n:] if n else lines

    def wait(self, timeout: float | None = None, *, raise_error: bool = True) -> TrainResult | None:
        """Wait for the run to end. Returns its result (None on timeout).

        Raises:
            OutOfMemoryError / TrainError: the run failed (unless ``raise_error=False``).
        """
        if not self._done.wait(timeout):
            return None
        if self._thread is not None:
            self._thread.join()
        if raise_error and self.error is not None:
            raise self.error
        return self.result

    def stop(self, *, grace: float | None = None, timeout: float | None = None) -> TrainResult | None:
        """Stop the run: SIGTERM to the child's process group, SIGKILL after `grace` seconds, flush sync.

        Safe to call twice and after the run ended. Returns the run's result.
        """
        if grace is not None:
            self.grace = grace
        self._stop.set()
        self._signal(signal.SIGTERM)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._done.wait(timeout)
        return self.result

    # -- running -----------------------------------------------------------------------------------------
    def start_background(self) -> "Job":
        self.background = True
        t = threading.Thread(target=self._run_safely, name=f"colabkit-train-{self.key}", daemon=True)
        self._thread = t
        t.start()
        return self

    def _run_safely(self) -> None:
        try:
            self.run()
        except BaseException as e:  # kept for wait()/status(): a background thread never raises into nothing
            if self.error is None:
                self.error = e
            log.error("%s: %s", self.experiment, e)

    def run(self) -> TrainResult:
        """Run every attempt in the calling thread; returns the result or raises the run's error."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self._stop_file.unlink()
        self._sweep_logs()
        for w in self.warnings:
            self._warn(w, record=False)
        restore = None
        try:
            self._freeze.start()
            self._start_sync()
            if not self.background:
                restore = _sigterm_as_interrupt()  # after sync's own handler, which it then chains to
            self._write_run_json()
            self._loop()
        except KeyboardInterrupt:
            self._stop.set()
            self._terminate_now()
            self._finish("stopped")
            raise
        except BaseException as e:
            if self.result is None:
                self.error = self.error or e
                self._finish("failed")
            raise
        finally:
            if restore is not None:
                restore()
            self._freeze.finish(wait=True)
            self._end_sync()
            self._done.set()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _loop(self) -> None:
        resume_from = self.initial_resume
        n = 0
        while True:
            n += 1
            att = self._attempt(n, resume_from)
            if att.outcome == "finished":
                self._finish("finished")
                return
            if att.outcome == "stopped" or self._stop.is_set():
                att.outcome = "stopped"
                self._finish("stopped")
                return
            if att.outcome == "oom":
                self.error = OutOfMemoryError(
                    f"{self.experiment}: the run ran out of memory (attempt {n}: {att.detail}); not restarted: "
                    f"{oom_advice(self.pre.tier, self.pre.gpu, self.experiment)}. "
                    f"{self._tail_text(att)}")
                self._finish("oom")
                return
            if n > self.max_restarts:
                self.error = TrainError(
                    f"{self.experiment}: {self.pre.script.name} failed {n} time{'s' if n != 1 else ''} "
                    f"(last: {att.detail}); gave up after {self.max_restarts} restart"
                    f"{'s' if self.max_restarts != 1 else ''} (--max-restarts). {self._tail_text(att)}")
                self._finish("failed")
                return
            delay = min(self.restart_backoff * 2 ** (n - 1), max(self.restart_backoff, MAX_BACKOFF))
            resume_from = self._newest_checkpoint() or resume_from
            if att.outcome == "stalled":
                self.feed.state("stalled", att)
            self.feed.state("restarted", att, resume_from=resume_from)
            self._set_state("waiting")
            self._warn(f"{self.experiment}: attempt {n} {att.detail}; restarting in {delay:g}s "
                       f"({n}/{self.max_restarts} restarts) from "
                       f"{resume_from if resume_from else 'scratch (no checkpoint yet)'}")
            if self._stop.wait(delay):
                self._finish("stopped")
                return

    def _attempt(self, n: int, resume_from: str | None) -> Attempt:
        log_path = self.log_dir / f"{self.run_id}.attempt{n}.log"
        att = Attempt(number=n, log=str(log_path), started=time.time(), resume_from=resume_from)
        with self._lock:
            self.attempts.append(att)
        self.progress.new_attempt()
        cmd = [self.python, "-u", "-c", BOOTSTRAP, str(self.pre.script), *self.args]
        if resume_from:
            cmd += ["--resume-from", str(resume_from)]  # torchrun passes it to every rank
        shown = cmd[4:]
        if self.launch.distributed:
            rank_logs = self.log_dir / f"{self.run_id}.attempt{n}.ranks"
            rank_logs.mkdir(parents=True, exist_ok=True)
            cmd = self.launch.command(self.python, cmd, log_dir=rank_logs)
            shown = ["-m", "torch.distributed.run", *cmd[4:cmd.index("--no-python")], *shown]
        env = dict(os.environ)
        env.update({"COLABKIT_EXPERIMENT": self.experiment, "COLABKIT_RUN_ID": self.run_id,
                    "COLABKIT_PROJECT_ROOT": str(self.config.root),
                    "COLABKIT_CHECKPOINT_DIR": str(self.checkpoint_dir), "COLABKIT_LOG_DIR": str(self.log_dir),
                    "COLABKIT_ATTEMPT": str(n), "COLABKIT_COMMAND_FORM": self.command_form,
                    "PYTHONUNBUFFERED": "1"})
        if resume_from:
            env["COLABKIT_RESUME_FROM"] = str(resume_from)
        else:
            env.pop("COLABKIT_RESUME_FROM", None)
        env.update(self.pre.data_env())
        if self.pre.max_vram:
            env["COLABKIT_MAX_VRAM"] = str(self.pre.max_vram)
        else:
            env.pop("COLABKIT_MAX_VRAM", None)
        if self.launch.distributed:
            env.update(self.launch.env())
        if self.config.source is not None:
            env.setdefault("COLABKIT_CONFIG", str(self.config.source))
        self._interrupted = False
        child = Child(distributed=self.launch.distributed, grace=self.grace)
        header = (f"# colabkit %train {self.experiment} run {self.run_id} attempt {n} on {socket.gethostname()} "
                  f"at {_stamp(att.started)}: {shlex.join([Path(self.python).name, *shown])}\n")
        with open(log_path, "ab", buffering=0) as logf:
            logf.write(header.encode())
            try:
                proc = child.spawn(cmd, cwd=self.cwd, env=env)
            except OSError as e:
                raise TrainError(f"{self.experiment}: cannot start {self.python}: {e.strerror}; check the "
                                 "interpreter") from None
            with self._lock:
                self._child = child
            att.pid = proc.pid
            # recorded as it starts, not only as it ends: a preemption kills this process too, and the journal
            # must still know where the attempt ran and what it resumed from
            self._write_run_json()
            self._set_state("stopping" if self._stop.is_set() else "running")
            if self._stop.is_set():
                self._signal(signal.SIGTERM)
            try:
                stalled = self._pump(proc, logf, att)
            except KeyboardInterrupt:
                att.outcome, att.detail = "stopped", "interrupted"
                self._stop.set()
                self._terminate_now()
                self._close_attempt(att, child)
                raise
            rc = self._close_attempt(att, child)
        att.exit_code = rc
        att.outcome, att.detail = self._classify(child, rc, stalled)
        if self._interrupted:
            att.detail = f"interrupted (exit code {rc})"
        with contextlib.suppress(OSError):
            with open(log_path, "ab") as f:
                f.write(f"# colabkit: attempt {n} {att.detail} at {_stamp(att.ended)}\n".encode())
        self._write_run_json()
        self._write_job_file(force=True)
        if self._interrupted:
            raise KeyboardInterrupt
        return att

    def _pump(self, proc: subprocess.Popen, logf, att: Attempt) -> bool:
        """Copy the child's output to the log and the caller until it exits; returns True if it stalled."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        tick = max(0.02, min(1.0, self.stall_after / 4))
        last_activity = time.monotonic()
        last_activity_wall = time.time()
        buf = b""
        stalled = False
        exited_at: float | None = None
        next_check = time.monotonic() + tick
        interrupted = False
        while True:
            try:
                ready, _, _ = select.select([fd], [], [], tick)
                now = time.monotonic()
                if ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    logf.write(chunk)
                    last_activity, last_activity_wall = now, time.time()
                    buf += chunk
                    if b"\n" in buf:
                        *lines, buf = buf.split(b"\n")
                        for raw in lines:
                            self._line(raw.decode("utf-8", "replace"), att)
                    if now < next_check:
                        continue
                next_check = now + tick
                # every tick, busy or idle: escalate a stop, notice a stall or an exit whose pipe a grandchild holds
                alive = proc.poll() is None
                child = self._child
                assert child is not None
                if alive:
                    child.track_ranks()
                    child.escalate(now)
                if not alive:
                    exited_at = exited_at or now
                    if now - exited_at > 1.0:
                        self._signal(signal.SIGKILL)  # its leftover children, still holding the pipe
                        break
                if self._stop.is_set() and child.kill_at is None and alive and not child.killed_by_us:
                    self._signal(signal.SIGTERM)
                if not self._stop.is_set() and self._stop_file.exists():
                    log.warning("%s: stop requested from another process", self.experiment)
                    self._stop.set()
                    self._signal(signal.SIGTERM)
                if not stalled and alive and now - last_activity > self.stall_after:
                    newest = self._newest_checkpoint_mtime()
                    if newest is not None and newest > last_activity_wall:
                        last_activity, last_activity_wall = now, time.time()
                    else:
                        stalled = True
                        self._warn(f"{self.experiment}: no output and no checkpoint for "
                                   f"{self.stall_after:g}s (train.stall_after); killing attempt {att.number}")
                        self._signal(signal.SIGTERM)
                if time.time() - self._job_file_written > JOB_FILE_INTERVAL:
                    self._write_job_file()
                if self._freeze.pending:
                    self._freeze.finish()
            except KeyboardInterrupt:
                # Ctrl-C / interrupting the kernel: stop the child but keep reading, so its last words reach
                # the log; a second interrupt kills it at once
                if interrupted:
                    self._signal(signal.SIGKILL)
                    raise
                interrupted = True
                self._stop.set()
                self._signal(signal.SIGTERM)
        if buf:
            self._line(buf.decode("utf-8", "replace"), att)
        self._interrupted = interrupted
        return stalled

    def _line(self, text: str, att: Attempt) -> None:
        self.feed.line(text, att, self._child)
        if self.estimate and not self._estimate_checked:
            self._check_estimate()
        if time.time() - self._job_file_written > JOB_FILE_INTERVAL:
            self._write_job_file()

    def _check_estimate(self) -> None:
        assert self.estimate is not None
        done, text = self.progress.against_estimate(self.estimate, elapsed=time.time() - self.started,
                                                    first_step=self.attempts[0].first_step or 0)
        self._estimate_checked = done
        if text:
            self._warn(f"{self.experiment}: {text}")

    def _classify(self, child: Child, rc: int, stalled: bool) -> tuple[str, str]:
        if not self._stop.is_set() and self._stop_file.exists():  # `train stop` from another process
            self._stop.set()
        if self._stop.is_set():
            return "stopped", f"stopped (exit code {rc})"
        if stalled:
            return "stalled", f"stalled (no output for {self.stall_after:g}s; killed, exit code {rc})"
        return child.classify(rc, "\n".join(self.feed.last(40)), oom_seen=child.oom_seen)

    def _close_attempt(self, att: Attempt, child: Child) -> int:
        rc = child.close()
        att.ended = time.time()
        att.exit_code = rc
        return rc

    def _signal(self, sig: int) -> None:
        """Signal the current attempt's child (see :meth:`colabkit.launch.Child.signal`)."""
        with self._lock:
            child = self._child
        if child is not None:
            child.grace = self.grace   # stop(grace=...) may have changed it
            child.signal(sig)

    def _terminate_now(self) -> None:
        """SIGTERM, wait up to `grace`, SIGKILL: used where nobody pumps the output any more."""
        with self._lock:
            child = self._child
        if child is not None:
            child.grace = self.grace
            child.terminate_now()

    def _sweep_logs(self) -> None:
        """Remove the temporaries runners that were killed left in this experiment's log folders (a pip freeze
        half written, a run.json never renamed); never one a live process is writing."""
        from .fsutil import sweep_temporaries
        try:
            gone = sweep_temporaries(self.log_dir.parent)
        except Exception as e:   # hygiene never stops a run
            log.debug("%s: sweeping %s failed: %s", self.experiment, self.log_dir.parent, e)
            return
        for path, _ in gone:
            log.info("%s: removed %s, left by a run that was killed", self.experiment, path)

    # -- checkpoints, sync, state -------------------------------------------------------------------------
    def _newest_checkpoint(self) -> str | None:
        """The newest local checkpoint that verifies (a restart resumes from it)."""
        from .checkpoints import latest_valid
        from .distributed import has_folders, latest_valid_unit
        try:
            # checkpoint folders (sharded saves) are checkpoints too: the newest unit that verifies
            found = (latest_valid_unit(self.checkpoint_dir) if has_folders(self.checkpoint_dir)
                     else latest_valid(self.checkpoint_dir))
        except (ColabkitError, OSError) as e:
            log.warning("%s: cannot read the checkpoints in %s: %s", self.experiment, self.checkpoint_dir, e)
            return None
        if found is None:
            return None
        info = found[0] if isinstance(found, tuple) else found
        return str(getattr(info, "path", info))

    def _newest_checkpoint_mtime(self) -> float | None:
        newest = None
        with contextlib.suppress(OSError):
            with os.scandir(self.checkpoint_dir) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        m = e.stat().st_mtime
                        newest = m if newest is None or m > newest else newest
        return newest

    def _start_sync(self) -> None:
        if not self.sync_enabled or not self.config.tiers:
            return
        try:
            from .sync import RunSync
        except ImportError:
            return
        self._sync = RunSync(self.config, [self.checkpoint_dir, self.log_dir.parent])
        self._sync.start()

    def _end_sync(self) -> None:
        if self._sync is not None:
            warning = self._sync.end()
            if warning:
                self._warn(f"{self.experiment}: {warning}")

    def _set_state(self, state: str) -> None:
        with self._lock:
            self.state = state
        self._write_job_file(force=True)

    def _warn(self, text: str, *, record: bool = True) -> None:
        if record:
            with self._lock:
                self.warnings.append(text)
        if self.on_warning is not None and not self.background:
            # the user reads it here; a warning-level record too would print it a second time (the CLI's stderr
            # handler, or logging's last-resort handler in a kernel)
            log.info("%s", text)
            self.on_warning(text)
        else:
            log.warning("%s", text)

    def _tail_text(self, att: Attempt) -> str:
        lines = self.feed.last(TAIL_LINES)
        if not lines:
            return f"It printed nothing (log: {att.log})."
        return f"Last lines of {att.log}:\n" + "\n".join("  " + x for x in lines)

    def _finish(self, state: str) -> None:
        with self._lock:
            if self.result is not None:
                return
            self.state = state
            last = self.attempts[-1] if self.attempts else None
            self.result = TrainResult(
                experiment=self.experiment, run_id=self.run_id, state=state,
                exit_code=last.exit_code if last else None, attempts=list(self.attempts), step=self.progress.step,
                total_steps=self.progress.total_steps, loss=self.progress.loss, log_dir=self.log_dir,
                last_checkpoint=self.progress.checkpoint_path, warnings=list(self.warnings),
                last_lines=self.feed.last(TAIL_LINES), elapsed=time.time() - self.started)
        self._write_run_json()
        self._write_job_file(force=True)
        with _jobs_lock:
            if _jobs.get(self.key) is self:
                del _jobs[self.key]
        self.feed.state(state, last, error=str(self.error) if self.error is not None else None)

    def _write_run_json(self) -> None:
        bundle = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            rec = json.loads((self.config.state_dir / "airlock" / f"{self.experiment}.json").read_text())
            bundle = rec.get("bundle") if isinstance(rec, dict) else None
        with self._lock:
            data = {"format": FORMAT, "experiment": self.experiment, "run_id": self.run_id,
                    "host": socket.gethostname(), "gpu": self.pre.gpu, "gpu_memory": self.pre.gpu_memory,
                    "tier": self.pre.tier, "max_vram": self.pre.max_vram, "python": sys.version.split()[0],
                    "script": str(self.pre.script), "args": self.args, "bundle": bundle,
                    "started": _stamp(self.started), "state": self.state,
                    "ended": _stamp() if self.result is not None else None,
                    "attempts": [a.as_dict() for a in self.attempts],
                    "exit_codes": [a.exit_code for a in self.attempts if a.exit_code is not None],
                    "last_step": self.progress.step, "total_steps": self.progress.total_steps,
                    "last_loss": self.progress.loss, "last_checkpoint": self.progress.checkpoint_path,
                    "warnings": list(self.warnings), "colabkit_version": _version()}
        with contextlib.suppress(OSError):
            atomic_write_json(self.log_dir / "run.json", data)

    def _write_job_file(self, *, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._job_file_written < JOB_FILE_INTERVAL:
            return
        self._job_file_written = now
        data = self.status()
        data.update({"format": FORMAT, "updated": now})
        with contextlib.suppress(OSError):
            atomic_write_json(self.job_file, data)


def _prior_history(job_file: Path, resume_from: str | None) -> list[Any]:
    """The loss curve of the run a checkpoint came from (the experiment's previous job file, e.g. before a
    kernel restart), up to the checkpoint's step: a resumed run continues the same curve."""
    if not resume_from:
        return []
    from .checkpoints import step_of
    from .distributed import folder_step
    step = step_of(resume_from)
    if step is None:   # a checkpoint folder
        step = folder_step(os.path.basename(os.path.normpath(str(resume_from))))
    prior = _read_job_file(job_file)
    if step is None or not prior or not isinstance(prior.get("history"), list):
        return []
    return [p for p in prior["history"] if isinstance(p, list) and len(p) == 2 and isinstance(p[0], int)
            and p[0] <= step]


def _version() -> str:
    from . import __version__
    return __version__


# -- the public API ---------------------------------------------------------------------------------------
def train(experiment: str, *, config: "Config | None" = None, background: bool = False,
          max_restarts: int | None = None, resume: str | os.PathLike | None = "auto",
          max_vram: int | str | None = None, estimate: float | str | None = None, args: Sequence[str] = (),
          on_line: Callable[[str], None] | None = None, on_warning: Callable[[str], None] | None = None,
          total_steps: int | None = None, sync: bool | None = None, stall_after: float | None = None,
          restart_backoff: float | None = None, grace: float | None = None, script: str | os.PathLike | None = None,
          python: str | None = None, listeners: Sequence["Listener"] = (), triggers: bool = True,
          output_dir: str | os.PathLike | None = None, name: str | None = None,
          run: str | None = None, on_unreachable: str | None = None, allow_network_data: bool = False,
          release_when_done: bool | str = False, releaser: Callable[[Any], None] | None = None,
          nproc_per_node: int | str | None = None, nnodes: int = 1, node_rank: int = 0,
          rdzv_endpoint: str | None = None) -> "TrainResult | Job":
    """Run ``experiments/<experiment>/train.py`` under supervision (see the module docstring).

    Args:
        experiment: ``vXX``.
        config: the configuration (default: loaded from the working directory).
        background: return a running :class:`Job` at once instead of waiting.
        max_restarts: restarts after a crash or stall (default ``train.max_restarts``).
        resume: ``auto`` (the newest verified checkpoint from any source, via :mod:`colabkit.resume`),
            ``none`` (a fresh start), or a checkpoint path.
        max_vram: GPU memory cap in bytes or ``20GB`` (default ``train.max_vram``; 20 GB on Tier 1).
        estimate: the expected duration in seconds (or ``6h``); a warning when the measured pace is off by
            more than half.
        args: extra arguments for train.py.
        on_line: called with each line the child prints (in the foreground: in the calling thread).
        on_warning: called with each warning (foreground only; background warnings are logged and kept in
            ``status()["warnings"]``).
        total_steps: for the ETA (default: ``--steps N`` in `args`, a ``step N/M`` line, ``train.total_steps``).
        sync: start background sync of the checkpoint and log folders (default: on when tiers are configured).
        stall_after, restart_backoff, grace: seconds (default: ``train.*``).
        script: a file to run instead of the experiment's train.py.
        python: the interpreter for the child (default: this one).
        listeners: callables given ``(events, line, attempt)`` for every line the child prints (parsed once),
            and a ``state`` event when the run is restarted, stalls or ends.
        triggers: run the experiment's trigger rules (:mod:`colabkit.triggers`) on this run's log.
        output_dir: a folder of its own for the run's checkpoints and logs (a cooldown run); `name` is then
            the job's name (``v01.cooldown_200``), `run` its identity in trigger entries.
        on_unreachable: with ``resume="auto"``: ``wait``, ``older`` or ``fail`` when a source that may hold a
            newer checkpoint cannot be reached (default ``resume.on_unreachable``; see :mod:`colabkit.resume`).
        allow_network_data: train from ``train.data_paths`` on a network/FUSE mount (refused by default).
        release_when_done: once the run has ended (finished, or failed after its restarts), release the Colab
            runtime or the VM through :func:`colabkit.release.release` if every tier verifiably holds the final
            checkpoint and logs; ``"force"`` releases even when a check fails (saying what may be lost).
        releaser: passed to :func:`colabkit.release.release` (tests; your own way of releasing).
        nproc_per_node: ranks on this node (``auto``: one per visible GPU; default ``train.nproc_per_node``);
            above 1 (or with `nnodes` > 1) the child is a torchrun group supervised as one job
            (:mod:`colabkit.launch`).
        nnodes, node_rank, rdzv_endpoint: a run over several nodes: their count, this node's rank (0 prints the
            progress) and node 0's ``HOST:PORT`` (a static rendezvous).
    Returns:
        A :class:`TrainResult` (foreground) or a :class:`Job` (background).
    Raises:
        PreflightError: a check before the start failed.
        OutOfMemoryError: the run ran out of memory (foreground; never restarted).
        TrainError: it failed more than `max_restarts` times (the message shows its last lines), or the
            experiment is already running.
        KeyboardInterrupt: re-raised after the child was stopped and sync flushed.
    """
    from .config import load_config, parse_duration
    cfg = config if config is not None else load_config()
    tr = cfg.train
    max_restarts = tr.max_restarts if max_restarts is None else max_restarts
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ConfigError(f"--max-restarts: {max_restarts!r} must be a whole number >= 0", key="max_restarts",
                          value=max_restarts)
    est = parse_duration(estimate, key="--estimate") if estimate is not None else None
    if est is not None and est <= 0:
        raise ConfigError(f"--estimate: {estimate!r} must be a positive duration, e.g. 6h", key="estimate",
                          value=estimate)
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps < 1):
        raise ConfigError(f"--total-steps: {total_steps!r} must be a whole number >= 1", key="total_steps",
                          value=total_steps)
    want_sync = bool(cfg.tiers) if sync is None else bool(sync)
    if want_sync:
        try:
            import colabkit.sync  # noqa: F401
        except ImportError:
            want_sync = False
    if release_when_done not in (False, True, "force", None):
        raise ConfigError(f"--release-when-done: {release_when_done!r} is not allowed; use --release-when-done or "
                          "--release-when-done=force", key="release_when_done", value=release_when_done)
    _check_name(experiment)
    from .launch import Launch
    for k, v, low in (("nnodes", nnodes, 1), ("node_rank", node_rank, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"--{k.replace('_', '-')}: {v!r} must be a whole number >= {low}", key=k, value=v)
    Launch(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint).check()
    key = name or experiment
    _refuse_if_running(cfg, key)
    pre = preflight(experiment, config=cfg, max_vram=max_vram, check_tiers=want_sync, script=script,
                    allow_network_data=allow_network_data, nproc_per_node=nproc_per_node)
    launch = Launch(nproc_per_node=pre.nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                    rdzv_endpoint=rdzv_endpoint)
    resume_from = _resume_source(cfg, experiment, resume, on_unreachable=on_unreachable, warn=on_warning)
    job = Job(experiment, config=cfg, pre=pre, args=args, max_restarts=max_restarts, resume_from=resume_from,
              restart_backoff=tr.restart_backoff if restart_backoff is None else restart_backoff,
              stall_after=tr.stall_after if stall_after is None else stall_after,
              grace=tr.grace if grace is None else grace, estimate=est, total_steps=total_steps, sync=want_sync,
              on_line=on_line, on_warning=on_warning, python=python,
              resume_policy=str(resume) if resume is not None else "none", listeners=listeners,
              output_dir=output_dir, name=name, run=run, launch=launch)
    if triggers:
        from . import triggers as _triggers
        _triggers.attach(job)
    with _jobs_lock:
        _jobs[key] = job
    _install_atexit()
    if background:
        job._write_job_file(force=True)
        job.start_background()
        if release_when_done:
            t = threading.Thread(target=_release_after, args=(job, release_when_done, releaser),
                                 name=f"colabkit-release-{experiment}", daemon=True)
            job._release_thread = t  # type: ignore[attr-defined]
            t.start()
        return job
    try:
        return job.run()
    finally:
        with _jobs_lock:
            if _jobs.get(key) is job:
                del _jobs[key]
        if release_when_done:
            _release_after(job, release_when_done, releaser)


def _release_after(job: "Job", mode: bool | str, releaser: Callable[[Any], None] | None) -> None:
    """The end of a run with --release-when-done: release only after it finished or gave up (never after a stop
    or Ctrl-C), and only when colabkit.release's checks pass (or ``force``). The decision goes to the cell (a
    foreground run), the log and ``.colabkit/logs/release.log``; it is kept in ``job.release_decision``."""
    job._done.wait()
    if job.state not in ("finished", "failed", "oom"):
        log.warning("%s: not releasing the runtime: the run was %s", job.experiment, job.state)
        return
    from . import release
    say = job.on_warning if (job.on_warning is not None and not job.background) else None
    try:
        job.release_decision = release.release(  # type: ignore[attr-defined]
            job.experiment, config=job.config, force=mode == "force", releaser=releaser, exclude_run=job.run_id,
            on_message=say)
    except ColabkitError as e:
        job._warn(f"{job.experiment}: releasing the runtime failed: {e}")


def _resume_source(cfg: "Config", experiment: str, resume: str | os.PathLike | None, *,
                   on_unreachable: str | None = None, warn: Callable[[str], None] | None = None) -> str | None:
    if resume is None or str(resume) == "none":
        return None
    if str(resume) == "auto":
        from . import resume as rs
        plan = rs.locate(config=cfg, experiment=experiment, on_unreachable=on_unreachable)
        path = rs.fetch(plan, progress=False)
        if path is not None and plan.unreachable:   # resume.on_unreachable: older: never quietly
            msg = f"{experiment}: resuming from an older checkpoint, {path}: {plan.reason}"
            log.warning("%s", msg)
            if warn is not None:
                warn(msg)
        elif path is not None:
            log.info("%s: resuming from %s (%s)", experiment, path, plan.reason)
        return str(path) if path is not None else None
    p = Path(resume).expanduser()
    if not p.is_absolute():
        p = (Path.cwd() / p) if (Path.cwd() / p).exists() else cfg.experiment_dir(experiment) / p
    from .distributed import classify_folder
    if not p.is_file() and not (p.is_dir() and classify_folder(p, any_name=True) is not None):
        raise PreflightError(f"--resume {resume}: no such checkpoint file; pass an existing checkpoint path, "
                             "auto (the newest verified one from any source) or none (a fresh start)")
    return str(p.resolve())


def _refuse_if_running(cfg: "Config", experiment: str) -> None:
    with _jobs_lock:
        job = _jobs.get(experiment)
    if job is not None and job.running:
        raise TrainError(f"{experiment} is already running in this kernel (run {job.run_id}, state {job.state}); "
                         f"stop it with '{command('train stop ' + experiment)}' or wait for it")
    other = _read_job_file(cfg.state_dir / "jobs" / f"{experiment}.json")
    if other and other.get("live") and other.get("pid") != os.getpid():
        raise TrainError(f"{experiment} is already running in process {other.get('pid')} on this machine "
                         f"(run {other.get('run_id')}); stop it with '{command('train stop ' + experiment)}'")


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


_ACTIVE = ("starting", "running", "waiting", "stopping")


# job files parsed, keyed on (inode, mtime, size): a dashboard refreshing every 2 s re-reads only files that changed
_job_file_cache: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
_job_file_lock = threading.Lock()


def _read_job_file(p: Path) -> dict[str, Any] | None:
    try:
        st = os.stat(p)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)  # each write is a rename: a new inode
        with _job_file_lock:
            hit = _job_file_cache.get(str(p))
        if hit is not None and hit[0] == key:
            data = dict(hit[1])
        else:
            parsed = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(parsed, dict):
                return None
            with _job_file_lock:
                _job_file_cache[str(p)] = (key, parsed)
            data = dict(parsed)
    except (OSError, ValueError):
        return None
    active = data.get("state") in _ACTIVE
    data["live"] = bool(active and _pid_alive(data.get("pid")))
    if active and not data["live"]:
        data["state"] = "lost"
        data["error"] = (f"the process that ran it ({data.get('pid')}) is gone; the child may still be running: "
                         f"pid {data.get('child_pid')}")
    return data


def _jobs_here(cfg: "Config | None", experiment: str | None) -> list[Job]:
    with _jobs_lock:
        jobs = list(_jobs.values())
    if cfg is not None:
        jobs = [j for j in jobs if j.config.root == cfg.root]
    return [j for j in jobs if experiment is None or j.experiment == experiment]


def status(*, config: "Config | None" = None, experiment: str | None = None) -> dict[str, Any]:
    """Every job of this project: those of this process, and those other processes recorded in
    ``<root>/.colabkit/jobs/`` (a CLI in another terminal sees a notebook's background run).

    Returns:
        ``{"jobs": [job status, ...]}``, newest first; each has experiment, state, attempt, step, total_steps,
        loss, rate, eta, log, pid.
    Raises:
        UnknownExperimentError: `experiment` is not here.
    """
    cfg = _cfg(config)
    if cfg is not None and experiment is not None:
        cfg.require_experiment(experiment)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for j in _jobs_here(cfg, experiment):
        out.append(j.status())
        seen.add(j.run_id)
    if cfg is not None:
        d = cfg.state_dir / "jobs"
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            data = _read_job_file(p)
            if not data or data.get("run_id") in seen:
                continue
            if experiment is not None and data.get("experiment") != experiment:
                continue
            out.append(data)
    out.sort(key=lambda d: -(d.get("started") or 0))
    return {"jobs": out}


def _cfg(config: "Config | None") -> "Config | None":
    if config is not None:
        return config
    from .config import load_config
    try:
        return load_config()
    except ColabkitError:
        return None


def _pick(cfg: "Config | None", experiment: str | None) -> tuple[Job | None, dict[str, Any] | None]:
    jobs = _jobs_here(cfg, experiment)
    if jobs:
        return jobs[0], None
    data = status(config=cfg, experiment=experiment)["jobs"]
    return None, (data[0] if data else None)


def logs(n: int = 50, *, experiment: str | None = None, config: "Config | None" = None) -> list[str]:
    """The last `n` lines of the running (or last) job's current attempt log.

    Raises:
        TrainError: no job has run for this project (or `experiment`).
    """
    cfg = _cfg(config)
    job, data = _pick(cfg, experiment)
    if job is not None:
        return job.logs(n)
    if data and data.get("log"):
        try:
            with open(data["log"], "r", encoding="utf-8", errors="replace") as f:
                lines = [x.rstrip("\n") for x in deque(f, maxlen=n or None)]
            return lines
        except OSError as e:
            raise TrainError(f"cannot read the log {data['log']}: {e.strerror}") from None
    raise TrainError(_no_job(experiment))


def _no_job(experiment: str | None) -> str:
    what = f"experiment {experiment!r}" if experiment else "this project"
    return (f"no training job found for {what}; start one with '{command('train vXX')}'"
            + (f" (or '{command('train vXX --background')}')" if command("train") != cli_form("train") else ""))


def stop(*, experiment: str | None = None, config: "Config | None" = None, grace: float | None = None,
         timeout: float | None = None) -> dict[str, Any]:
    """Stop the running job(s): SIGTERM to the child's process group, SIGKILL after `grace`, flush sync.

    A job run by another process on this machine is asked to stop through its job file, and its child is
    sent SIGTERM. Safe to call twice.

    Returns:
        ``{"stopped": [status after stopping, ...]}`` (empty when nothing was running).
    """
    cfg = _cfg(config)
    if cfg is not None and experiment is not None:
        cfg.require_experiment(experiment)
    stopped: list[dict[str, Any]] = []
    for j in _jobs_here(cfg, experiment):
        j.stop(grace=grace, timeout=timeout)
        stopped.append(j.status())
    if not stopped and cfg is not None:
        for data in status(config=cfg, experiment=experiment)["jobs"]:
            if not data.get("live"):
                continue
            stop_file = cfg.state_dir / "jobs" / f"{data['experiment']}.stop"
            atomic_write_text(stop_file, f"{_stamp()}\n")
            if data.get("child_pid"):
                with contextlib.suppress(ProcessLookupError, PermissionError, TypeError, ValueError):
                    os.killpg(int(data["child_pid"]), signal.SIGTERM)
            data["state"] = "stopping"
            stopped.append(data)
    return {"stopped": stopped}


def wait(*, experiment: str | None = None, config: "Config | None" = None,
         timeout: float | None = None) -> dict[str, Any]:
    """Wait for the background run(s) of this kernel to end (``%train wait``), e.g. before a notebook's last
    cell flushes every tier; a run of another process on this machine is followed through its job file.

    Args:
        experiment: only this experiment's run (default: every run of this project).
        timeout: give up after this many seconds (default: wait as long as it runs).
    Returns:
        ``{"jobs": [status, ...], "timed_out": bool}`` (each status as :func:`status` gives it: state, step,
        loss, checkpoint, log).
    Raises:
        TrainError: no run has been started for this project (or `experiment`).
    """
    cfg = _cfg(config)
    deadline = None if timeout is None else time.monotonic() + timeout
    left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
    jobs = _jobs_here(cfg, experiment)
    timed_out = False
    if jobs:
        for j in jobs:
            if j.wait(left(), raise_error=False) is None and j.running:
                timed_out = True
        return {"jobs": [j.status() for j in jobs], "timed_out": timed_out}
    data = status(config=cfg, experiment=experiment)["jobs"] if cfg is not None else []
    if not data:
        raise TrainError(_no_job(experiment))
    tick = threading.Event()  # never set: a bounded pause between reads of the other process's job file
    while any(d.get("live") for d in data):
        pause = 1.0 if deadline is None else min(1.0, left() or 0.0)
        if pause <= 0:
            timed_out = True
            break
        tick.wait(pause)
        data = status(config=cfg, experiment=experiment)["jobs"]
    return {"jobs": data, "timed_out": timed_out}


def _stop_all_at_exit() -> None:
    with _jobs_lock:
        jobs = list(_jobs.values())
    for j in jobs:
        with contextlib.suppress(Exception):
            j.stop(grace=min(j.grace, 10.0), timeout=30.0)


def _install_atexit() -> None:
    global _atexit_installed
    if not _atexit_installed:
        atexit.register(_stop_all_at_exit)
        _atexit_installed = True
