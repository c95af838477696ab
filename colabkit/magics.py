"""IPython magics: %airlock, %train, %sync, %resume, %journal, %triggers and %colabkit.

Each magic parses its line with the same parser as the ``colabkit`` CLI (``%sync start --every 90m``
is ``colabkit sync start --every 90m``) and calls the same handler. A ColabkitError becomes IPython's
UsageError: one line, no traceback. Nothing heavy is imported when the extension loads.
"""
from __future__ import annotations

import shlex
from typing import Any

from .commands import MAGICS, ArgumentError, Context, HelpShown, parse, run
from .errors import ColabkitError
from .secrets import install_log_redaction, redact

_registered: dict[int, list[str]] = {}


def _make_magic(name: str, command: str | None):
    def magic(line: str = "", cell: str | None = None) -> None:
        from IPython.core.error import UsageError
        from IPython import get_ipython
        argv = shlex.split(line)
        if command is not None:
            argv = [command, *argv]
        try:
            args = parse(argv, prog="%colabkit" if command is None else "%")
        except HelpShown:
            return None
        except ArgumentError as e:
            raise UsageError(_magic_text(str(e), name, command)) from None
        from .runtime import in_notebook
        # a widget needs a notebook front end; a terminal IPython (or an agent's shell) gets text
        ctx = Context(notebook=in_notebook(), shell=get_ipython())
        try:
            rc = run(args, ctx)
        except ColabkitError as e:
            raise UsageError(redact(str(e))) from None
        except KeyboardInterrupt:
            print("Interrupted.")
            return None
        if rc not in (0, None) and not ctx.json:
            ctx.stdout(f"(exit status {rc})")
        return None

    magic.__name__ = name
    magic.__doc__ = f"%{name}: the same as `colabkit {command or ''} ...`; `%{name} --help` for usage."
    return magic


def _magic_text(message: str, name: str, command: str | None) -> str:
    """argparse names the program '% sync ...'; show it the way the user typed it: '%sync ...'."""
    if command is not None and message.startswith(f"% {command}"):
        return f"%{name}" + message[len(f"% {command}"):]
    return message


def load(ipython: Any) -> None:
    """Register the magics on `ipython` (idempotent: re-running %load_ext replaces them)."""
    install_log_redaction()
    names = []
    for name, command in MAGICS.items():
        ipython.register_magic_function(_make_magic(name, command), magic_kind="line", magic_name=name)
        names.append(name)
    _registered[id(ipython)] = names


def unload(ipython: Any) -> None:
    names = _registered.pop(id(ipython), [])
    line_magics = ipython.magics_manager.magics.get("line", {})
    for name in names:
        line_magics.pop(name, None)
