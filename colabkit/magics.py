"""IPython magics: %airlock, %train, %sync, %resume, %triggers, %data, %release, %journal and %colabkit.

Each magic parses its line with the same parser as the ``colabkit`` CLI (``%sync start --every 90m``
is ``colabkit sync start --every 90m``) and calls the same handler. A ColabkitError becomes IPython's
UsageError: one line, no traceback. Nothing heavy is imported when the extension loads.
"""
from __future__ import annotations

import shlex
from typing import Any

from .commands import MAGICS, ArgumentError, Context, HelpShown, build_parser, magic_form, magic_prog, parse, run
from .errors import ColabkitError
from .runtime import command_form, set_default_command_form
from .secrets import install_log_redaction, redact

_registered: dict[int, list[str]] = {}


def _make_magic(name: str, command: str | None):
    def magic(line: str = "", cell: str | None = None) -> None:
        from IPython.core.error import UsageError
        from IPython import get_ipython
        argv = shlex.split(line)
        if command is not None:
            argv = [command, *argv]
        with command_form(magic_form):  # next steps in messages read '%airlock pull v01', not 'colabkit ...'
            if not argv:  # bare %colabkit: the help, as bare `colabkit` prints it
                print(build_parser("%colabkit", command_prog=magic_prog).format_help(), end="")
                return None
            try:
                args = parse(argv, prog="%colabkit", command_prog=magic_prog)
            except HelpShown:
                return None
            except ArgumentError as e:
                raise UsageError(str(e)) from None
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


def load(ipython: Any) -> None:
    """Register the magics on `ipython` (idempotent: re-running %load_ext replaces them)."""
    install_log_redaction()
    # in this kernel, what runs outside a magic (a background run, the API) names next steps as magics too
    set_default_command_form(magic_form)
    names = []
    for name, command in MAGICS.items():
        ipython.register_magic_function(_make_magic(name, command), magic_kind="line", magic_name=name)
        names.append(name)
    _registered[id(ipython)] = names


def unload(ipython: Any) -> None:
    names = _registered.pop(id(ipython), [])
    if not _registered:
        set_default_command_form(None)
    line_magics = ipython.magics_manager.magics.get("line", {})
    for name in names:
        line_magics.pop(name, None)
