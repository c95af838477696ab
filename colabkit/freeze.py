"""``pip freeze`` of the interpreter a run's child uses, kept beside the run's logs (``frozen_requirements.txt``).

:class:`Freeze` takes it as the run starts, beside the first attempt (pip costs about a second, which the
training need not wait for): pip writes into a temporary that names its writer (so a run killed meanwhile leaves
nothing a later sweep cannot tell apart from a live one), renamed into place once pip exits.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Callable

from .fsutil import atomic_write_text, temp_prefix

NAME = "frozen_requirements.txt"


def pip_freeze(dest: Path, *, python: str | None = None, timeout: float = 120.0) -> Path:
    """``pip freeze`` of the interpreter the child runs, written atomically to `dest`.

    Falls back to the installed distributions' names and versions when pip itself is missing.
    """
    exe = python or sys.executable
    try:
        out = subprocess.run([exe, "-m", "pip", "freeze", "--disable-pip-version-check"], capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        text = out.stdout if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        text = None
    if text is None:
        from importlib import metadata
        names = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                        if d.metadata and d.metadata["Name"]}, key=str.lower)
        text = "# pip is not available: installed distributions\n" + "\n".join(names) + "\n"
    atomic_write_text(dest, text)
    return dest


class Freeze:
    """``pip freeze`` of `python` into ``log_dir/frozen_requirements.txt``, taken in the background.

    :meth:`start` starts pip; :meth:`finish` renames its output into place once pip has exited (with
    ``wait=True``: waits for it, at the latest when the run ends). Where pip cannot run, the installed
    distributions are listed instead (:func:`pip_freeze`)."""

    def __init__(self, log_dir: Path, *, python: str, warn: Callable[[str], None]) -> None:
        self.dest = log_dir / NAME
        self.python = python
        self.warn = warn
        self._pending: tuple[subprocess.Popen, IO[bytes], Path] | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def start(self) -> None:
        tmp = self.dest.with_name(f"{temp_prefix(self.dest.name)}freeze")   # names its writer: swept if we die
        try:
            f = open(tmp, "wb")
        except OSError as e:
            self.warn(f"cannot write {tmp}: {e.strerror}")
            return
        try:
            proc = subprocess.Popen([self.python, "-m", "pip", "freeze", "--disable-pip-version-check"], stdout=f,
                                    stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            f.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            pip_freeze(self.dest, python=self.python)  # falls back to the installed distributions
            return
        self._pending = (proc, f, tmp)

    def finish(self, *, wait: bool = False) -> None:
        if self._pending is None:
            return
        proc, f, tmp = self._pending
        if not wait and proc.poll() is None:
            return
        self._pending = None
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            rc = rc or 1
        finally:
            f.close()
        if rc == 0:
            os.replace(tmp, self.dest)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
            pip_freeze(self.dest, python=self.python)


__all__ = ["Freeze", "pip_freeze", "NAME"]
