"""How a run's child is launched: one process, or a torchrun group supervised as one job.

``%train vXX --nproc-per-node N`` makes the child ``python -m torch.distributed.run --standalone
--nproc-per-node N --max-restarts 0 --tee 3 --log-dir DIR --no-python python -u -c BOOTSTRAP train.py ARGS``
(with ``--nnodes/--node-rank/--rdzv-endpoint``: a static rendezvous instead of ``--standalone``). torchrun's own
restarts are off: a failed rank ends the group, and colabkit restarts the whole group from the newest verified
checkpoint. Every rank's output reaches the supervisor prefixed ``[rankN]:`` (global rank); progress is read from
rank 0's lines only.

torchrun starts each rank in a session of its own, so a signal to torchrun's process group does not reach
the ranks: :func:`child_pids` finds them (children of the torchrun process) so the supervisor signals each
rank's group too, and kills any left after torchrun itself is gone.

:class:`Child` is one attempt's child (the process, or torchrun and its ranks): started in a session of its
own, signalled as a group, SIGTERM escalated to SIGKILL after the grace time, nothing left running when it is
closed. :func:`classify_exit` tells from an exit how the attempt ended (crashed, out of memory, which rank).

Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ConfigError

#: a rank's line as torchrun's tee prints it (TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE below)
RANK_LINE = re.compile(r"^\[rank(\d+)\]:")
PREFIX_TEMPLATE = "[rank${rank}]:"
# torchrun's failure summary: "rank : 1 (local_rank: 1)" then "exitcode : -9 (pid: 1234)"
_FAILED_RANK = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def parse_nproc(value: Any, *, key: str = "--nproc-per-node") -> int | str:
    """``auto`` or a whole number >= 1 (``"2"`` from the command line)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        n = None
    if n is None or n < 1 or (isinstance(value, float) and value != n):
        raise ConfigError(f"{key}: {value!r} must be a whole number >= 1 or 'auto' (one rank per visible GPU)",
                          key=key.lstrip("-").replace("-", "_"), value=value)
    return n


@dataclass(frozen=True)
class Launch:
    """The shape of a run: ranks per node and, for several nodes, this node's place in the rendezvous."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes: {self.nnodes} must be >= 1", key="nnodes", value=self.nnodes)
        if self.nnodes > 1:
            if not self.rdzv_endpoint:
                raise ConfigError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address, the "
                                  "same on every node) and --node-rank R", key="rdzv_endpoint", value=None)
            if not 0 <= self.node_rank < self.nnodes:
                raise ConfigError(f"--node-rank: {self.node_rank} must be between 0 and {self.nnodes - 1} "
                                  f"(--nnodes {self.nnodes})", key="node_rank", value=self.node_rank)
        elif self.node_rank or self.rdzv_endpoint:
            raise ConfigError("--node-rank and --rdzv-endpoint are for runs on several nodes; add --nnodes N",
                              key="nnodes", value=self.nnodes)

    def command(self, python: str, child: list[str], *, log_dir: Path) -> list[str]:
        """The torchrun command that runs `child` (``[python, -u, -c, BOOTSTRAP, train.py, ARGS]``) on every rank."""
        cmd = [python, "-u", "-m", "torch.distributed.run"]
        if self.nnodes > 1:
            cmd += ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank), "--rdzv-backend", "static",
                    "--rdzv-endpoint", str(self.rdzv_endpoint)]
        else:
            cmd += ["--standalone"]
        cmd += ["--nproc-per-node", str(self.nproc_per_node), "--max-restarts", "0", "--tee", "3",
                "--log-dir", str(log_dir), "--no-python", *child]
        return cmd

    def env(self) -> dict[str, str]:
        return {"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": PREFIX_TEMPLATE,
                "COLABKIT_NPROC_PER_NODE": str(self.nproc_per_node), "COLABKIT_NNODES": str(self.nnodes),
                "COLABKIT_NODE_RANK": str(self.node_rank)}

    def as_dict(self) -> dict[str, Any]:
        return {"nproc_per_node": self.nproc_per_node, "nnodes": self.nnodes, "node_rank": self.node_rank,
                "rdzv_endpoint": self.rdzv_endpoint}


def split_rank(text: str) -> tuple[int | None, str]:
    """``[rank1]:text`` -> ``(1, "text")``; a line of torchrun's own -> ``(None, text)``."""
    m = RANK_LINE.match(text)
    if not m:
        return None, text
    return int(m.group(1)), text[m.end():]


def strip_ranks(text: str) -> str:
    return re.sub(r"(?m)^\[rank\d+\]:", "", text)


def failed_rank(text: str) -> tuple[int, int] | None:
    """(global rank, exit code) of the first failure in torchrun's summary, or None."""
    root = text.rfind("Root Cause")  # torchrun lists the ranks it ended itself under "Other Failures"
    m = (_FAILED_RANK.search(text, root) if root >= 0 else None) or _FAILED_RANK.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc; empty elsewhere)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read().decode("ascii", "replace")
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) > 1 and fields[1] == str(pid):
                out.append(int(name))
    return out


def signal_groups(pids: list[int] | set[int], sig: int) -> None:
    """Signal the process group of every rank that still leads its own group (a reused pid is left alone)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)


def alive(pids: list[int] | set[int]) -> list[int]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().decode("ascii", "replace")
            if state[state.rfind(")") + 2:][:1] not in ("Z", "X"):
                out.append(pid)
    return out


# -- one attempt's child ---------------------------------------------------------------------------------
# what a run that ran out of memory prints (PyTorch, the CUDA caching allocator, cuBLAS, Python)
OOM_TEXT = [re.compile(p, re.MULTILINE) for p in (
    r"CUDA out of memory", r"CUDA error: out of memory", r"torch\.(?:cuda\.)?OutOfMemoryError",
    r"CUBLAS_STATUS_ALLOC_FAILED", r"^\s*MemoryError\b", r"\bMemoryError:", r"Cannot allocate memory")]


def oom_text(text: str) -> str | None:
    """The out-of-memory message in `text`, or None."""
    m = next((m for m in (p.search(text) for p in OOM_TEXT) if m), None)
    return m.group(0).strip() if m else None


def oom_kills() -> int | None:
    """The kernel OOM killer's count for this cgroup (v2 or v1), or None where it cannot be read."""
    for p, key in (("/sys/fs/cgroup/memory.events", "oom_kill"), ("/sys/fs/cgroup/memory/memory.oom_control",
                                                                  "oom_kill")):
        try:
            for line in Path(p).read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


class Child:
    """One attempt's child: the process (or torchrun and the ranks it starts), in a session of its own so that
    a kernel interrupt never reaches it, signalled as a group.

    :meth:`signal` with SIGTERM arms the escalation: :meth:`escalate` sends SIGKILL once `grace` seconds have
    passed (the supervisor calls it every tick). :meth:`close` waits for the exit and kills the ranks torchrun
    left behind (it was killed before it could end them): nothing stays running.
    """

    def __init__(self, *, distributed: bool, grace: float) -> None:
        self.distributed = distributed
        self.grace = grace
        self.proc: subprocess.Popen | None = None
        self.ranks: set[int] = set()       # the ranks' pids under torchrun (each leads a session of its own)
        self.kill_at: float | None = None  # when a SIGTERM that was not obeyed becomes a SIGKILL
        self.killed_by_us = False          # a SIGTERM/SIGKILL of ours: not the OOM killer's
        self.oom_before = oom_kills()      # the OOM killer's count as the attempt starts
        self.oom_seen: str | None = None   # the first OOM text a rank printed (torchrun's report may push it out)
        self._lock = threading.Lock()

    def spawn(self, cmd: Sequence[str], *, cwd: str | os.PathLike, env: Mapping[str, str]) -> subprocess.Popen:
        """Start `cmd` with its output (stdout and stderr together) on a pipe; raises OSError as Popen does."""
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, bufsize=0)
        with self._lock:
            self.proc = proc
        return proc

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def signal(self, sig: int) -> None:
        """Signal the child's process group (and every rank's, under torchrun)."""
        with self._lock:
            proc = self.proc
        if proc is None or proc.returncode is not None and sig != signal.SIGKILL:
            return
        if sig in (signal.SIGTERM, signal.SIGKILL):
            self.killed_by_us = True
        if sig == signal.SIGTERM and self.kill_at is None:
            self.kill_at = time.monotonic() + self.grace
        if self.distributed:
            # torchrun puts every rank in a session of its own: signal each rank's group as well as torchrun's
            if proc.returncode is None:
                self.track_ranks()
            signal_groups(self.ranks, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def track_ranks(self) -> None:
        """Remember torchrun's children (the ranks) while it runs: they are signalled and reaped with it."""
        proc = self.proc
        if self.distributed and proc is not None:
            self.ranks.update(child_pids(proc.pid))

    def escalate(self, now: float) -> None:
        """SIGKILL a child that did not end within `grace` of a SIGTERM."""
        if self.kill_at is not None and now >= self.kill_at:
            self.signal(signal.SIGKILL)
            self.kill_at = None

    def terminate_now(self) -> None:
        """SIGTERM, wait up to `grace`, SIGKILL: used where nobody pumps the output any more."""
        with self._lock:
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def close(self) -> int:
        """Wait for the exit (SIGKILL after `grace`), kill the ranks left behind, close the pipe; the exit code."""
        proc = self.proc
        assert proc is not None
        try:
            rc = proc.wait(timeout=max(self.grace, 1.0))
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            rc = proc.wait()
        if self.ranks:
            left = alive(self.ranks)
            if left:
                signal_groups(left, signal.SIGKILL)
        with contextlib.suppress(OSError):
            assert proc.stdout is not None
            proc.stdout.close()
        return rc

    def classify(self, rc: int, tail: str, *, oom_seen: str | None = None) -> tuple[str, str]:
        """How the child ended: ``("finished" | "oom" | "crashed", detail)`` (see :func:`classify_exit`)."""
        return classify_exit(rc, tail, distributed=self.distributed, oom_seen=oom_seen,
                             killed_by_us=self.killed_by_us, oom_before=self.oom_before)


def classify_exit(rc: int, tail: str, *, distributed: bool = False, oom_seen: str | None = None,
                  killed_by_us: bool = False, oom_before: int | None = None) -> tuple[str, str]:
    """``("finished" | "oom" | "crashed", detail)`` from an exit code and the last lines the child printed.

    Out of memory: an OOM text in the tail (or `oom_seen`, one a rank printed earlier), or a SIGKILL that was not
    ours while the kernel's OOM killer count rose (or cannot be read). Under torchrun the failed rank is named.
    """
    if rc == 0:
        return "finished", "finished (exit code 0)"
    failed = None
    if distributed:
        tail = strip_ranks(tail)
        failed = failed_rank(tail)
    text = oom_text(tail) or oom_seen
    if text:
        return "oom", f"exit code {rc}, {text!r} in its output"

    def oom_killer() -> bool:
        after = oom_kills()
        return oom_before is None or after is None or after > oom_before
    if rc in (-signal.SIGKILL, 137) and not killed_by_us and oom_killer():
        return "oom", f"killed by SIGKILL (exit code {rc}), which is what the kernel's OOM killer does"
    if failed is not None:  # torchrun ended the group because a rank failed
        rank, code = failed
        if code == -signal.SIGKILL and not killed_by_us and oom_killer():
            return "oom", (f"rank {rank} killed by SIGKILL (torchrun exit code {rc}), which is what the "
                           "kernel's OOM killer does")
        how = f"exit code {code}"
        if code < 0:
            with contextlib.suppress(ValueError):
                how = f"killed by {signal.Signals(-code).name}"
        return "crashed", f"rank {rank} {how} (torchrun exit code {rc})"
    if rc < 0:
        with contextlib.suppress(ValueError):
            return "crashed", f"killed by {signal.Signals(-rc).name} (exit code {rc})"
    return "crashed", f"exited with code {rc}"


__all__ = ["Launch", "parse_nproc", "split_rank", "strip_ranks", "failed_rank", "child_pids", "signal_groups",
           "alive", "Child", "classify_exit", "oom_text", "oom_kills", "OOM_TEXT"]
