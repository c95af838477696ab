"""The ``colabkit`` command: parse -> call the API -> render. No logic of its own.

Exit codes: 0 success (bare ``colabkit`` prints the help, like ``--help``), 1 a colabkit error
(``Error: ...`` on stderr), 2 bad arguments (a command group without its subcommand, ``colabkit sync``, prints
that group's help and the error), 3 drift (``airlock status``), 130 interrupted.
Messages that name a next step write it as a terminal command (``colabkit airlock pull v01``).
"""
from __future__ import annotations

import logging
import sys

from .commands import ArgumentError, Context, HelpShown, build_parser, parse, run
from .errors import ColabkitError
from .runtime import cli_form, command_form
from .secrets import install_log_redaction, redact


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (also usable from tests)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    install_log_redaction()
    _log_to_stderr()
    with command_form(cli_form):
        return _main(argv)


def _main(argv: list[str]) -> int:
    if not argv:  # a first contact: what there is to do, not an error
        print(build_parser().format_help(), end="", flush=True)
        return 0
    try:
        args = parse(argv)
    except HelpShown:
        return 0
    except ArgumentError as e:
        if e.missing_command and e.parser is not None:
            print(e.parser.format_help(), file=sys.stderr)
        print(f"Error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args, Context())
    except ColabkitError as e:
        print(f"Error: {redact(str(e))}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (a test's capture, a notebook's stream), never a stale one."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def _log_to_stderr() -> None:
    """Warnings from colabkit reach a terminal user; configured only for the CLI, never on import."""
    logger = logging.getLogger("colabkit")
    if not any(getattr(h, "_colabkit_cli", False) for h in logger.handlers):
        h = _CurrentStderrHandler()
        h.setFormatter(logging.Formatter("colabkit: %(levelname)s: %(message)s"))
        h.setLevel(logging.WARNING)
        h._colabkit_cli = True  # type: ignore[attr-defined]
        logger.addHandler(h)


if __name__ == "__main__":  # python -m colabkit.cli
    sys.exit(main())
