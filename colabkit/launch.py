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

Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


__all__ = ["Launch", "parse_nproc", "split_rank", "strip_ranks", "failed_rank", "child_pids", "signal_groups",
           "alive"]
