"""Where are we running: Colab, a VM, a notebook, an agent; GPU, memory tier, mounts.

No heavy imports: the GPU is read through ``nvidia-smi``, never by importing torch.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

#: file-system types on which inotify sees nothing or that are too slow to train from
NETWORK_FS = {"fuse", "fuseblk", "fuse.drivefs", "fuse.rclone", "fuse.gcsfuse", "fuse.sshfs", "nfs", "nfs4",
              "cifs", "smbfs", "smb3", "9p", "sshfs", "davfs", "gcsfuse", "afs", "ceph", "glusterfs", "lustre"}

#: GPUs with about 24 GB or less: Tier 1 (home base), jobs capped at 20 GB by default
TIER1_GPU_NAMES = ("L4", "T4", "A10", "A10G", "RTX", "P100", "V100", "K80", "P4")
TIER1_DEFAULT_CAP = 20 * 10**9


@dataclass(frozen=True)
class GPU:
    name: str
    memory_total: int  # bytes

    @property
    def tier(self) -> int:
        """1 for an L4-class GPU (<= ~24 GB), 2 for an A100/H100-class one."""
        return 1 if self.memory_total <= 26 * 10**9 else 2


@dataclass(frozen=True)
class Runtime:
    host: str
    platform: str                 # colab | vm | local
    frontend: str                 # notebook | terminal | agent
    python: str
    gpus: tuple[GPU, ...] = field(default_factory=tuple)

    @property
    def tier(self) -> int | None:
        """The hardware tier: 1 (L4-class), 2 (A100-class), None without a GPU."""
        return min(g.tier for g in self.gpus) if self.gpus else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tier"] = self.tier
        return d


def in_colab() -> bool:
    return "google.colab" in sys.modules or bool(os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU"))


def in_notebook() -> bool:
    """True inside a Jupyter kernel (Colab, VS Code, JupyterLab), False in a terminal IPython or a script."""
    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    try:
        shell = ip.get_ipython()
    except Exception:
        return False
    return shell is not None and type(shell).__name__ in ("ZMQInteractiveShell", "Shell")


def frontend() -> str:
    if in_notebook():
        return "notebook"
    if os.environ.get("COLABKIT_AGENT") or not (sys.stdout and sys.stdout.isatty()):
        return "agent"
    return "terminal"


# -- how the user types a command here --------------------------------------------------------------
def cli_form(line: str) -> str:
    """``airlock pull v01`` -> ``colabkit airlock pull v01`` (a terminal)."""
    return f"colabkit {line}"


_default_form: Callable[[str], str] = cli_form
_form: contextvars.ContextVar[Callable[[str], str] | None] = contextvars.ContextVar("colabkit_command_form",
                                                                                   default=None)


def command(line: str) -> str:
    """A colabkit command line, written the way the user types it where they are.

    Messages that name a next step build it with this, never with a fixed ``%magic`` or ``colabkit`` prefix:
    the CLI and the magics set the form for the call they run (:func:`command_form`), and loading the IPython
    extension makes the magic form the default of the kernel (background threads, API calls).

    Args:
        line: the command without the program name, e.g. ``airlock pull v01``.
    Returns:
        ``colabkit airlock pull v01`` in a terminal, ``%airlock pull v01`` in IPython.
    """
    form = _form.get() or _default_form
    if form is cli_form and os.environ.get("COLABKIT_COMMAND_FORM") == "magic":
        # a train.py that %train started: what it prints lands in the notebook cell
        from .commands import magic_form  # light: argparse and the error types
        form = magic_form
    return form(line)


@contextlib.contextmanager
def command_form(form: Callable[[str], str]) -> Iterator[None]:
    """Within the block, :func:`command` writes commands with `form` (e.g. :func:`cli_form`)."""
    token = _form.set(form)
    try:
        yield
    finally:
        _form.reset(token)


def set_default_command_form(form: Callable[[str], str] | None) -> None:
    """The form used outside any :func:`command_form` block (None: the terminal's)."""
    global _default_form
    _default_form = form or cli_form


@functools.lru_cache(maxsize=1)
def gpus() -> tuple[GPU, ...]:
    """GPUs seen by nvidia-smi (empty without one). ``COLABKIT_FAKE_GPU=NAME:BYTES`` overrides, for tests."""
    fake = os.environ.get("COLABKIT_FAKE_GPU")
    if fake:
        name, _, mem = fake.rpartition(":")
        return (GPU(name or "GPU", int(mem)),)
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    found = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            found.append(GPU(name.strip(), int(float(mib.strip()) * 2**20)))
        except ValueError:
            continue
    return tuple(found)


def detect() -> Runtime:
    plat = "colab" if in_colab() else ("vm" if Path("/sys/class/dmi/id/product_name").exists()
                                        and "Google" in _read("/sys/class/dmi/id/product_name") else "local")
    return Runtime(host=socket.gethostname(), platform=plat, frontend=frontend(),
                   python=sys.version.split()[0], gpus=gpus())


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str

    @property
    def is_network(self) -> bool:
        return self.fstype in NETWORK_FS or self.fstype.startswith("fuse")


def mounts() -> list[Mount]:
    out = []
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append(Mount(parts[1].replace("\\040", " "), parts[2], parts[0]))
    return out


def mount_of(path: str | os.PathLike) -> Mount | None:
    """The mount holding `path` (the longest mount point that is a prefix of its real path)."""
    real = os.path.realpath(os.fspath(path))
    best: Mount | None = None
    for m in mounts():
        mp = m.point.rstrip("/") or "/"
        if real == mp or real.startswith(mp + "/") or mp == "/":
            if best is None or len(mp) > len(best.point.rstrip("/") or "/"):
                best = m
    return best


def is_network_path(path: str | os.PathLike) -> bool:
    """True when `path` lives on a FUSE or network file system (a mounted Drive, NFS, ...).

    ``COLABKIT_NETWORK_PATHS`` (os.pathsep-separated prefixes) marks more paths as such, for tests.
    """
    real = os.path.realpath(os.fspath(path))
    for prefix in filter(None, os.environ.get("COLABKIT_NETWORK_PATHS", "").split(os.pathsep)):
        p = os.path.realpath(prefix)
        if real == p or real.startswith(p.rstrip("/") + "/"):
            return True
    m = mount_of(real)
    return bool(m and m.is_network)
