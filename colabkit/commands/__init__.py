"""The one definition of every command, shared by the ``colabkit`` CLI and the IPython magics.

Each module here registers an argparse sub-parser (``register(subparsers)``) whose leaves set
``func=handler``. A handler takes ``(args, ctx)``, calls the public API, and renders through ``ctx``;
it returns an exit code (0, or e.g. 3 for drift). ``%sync start --every 3600`` and
``colabkit sync start --every 3600`` parse with the same parser and call the same handler, so the
magic, the CLI and the API share names and parameters by construction.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..errors import ConfigError

#: command modules, in the order `colabkit --help` lists them
COMMANDS = ("init", "demo", "airlock", "train", "sync", "resume", "triggers", "data", "release", "journal", "status",
            "dashboard",
            "config")
#: IPython line magics and the CLI command each maps to (None: the whole CLI, `%colabkit config show`)
MAGICS = {"airlock": "airlock", "train": "train", "sync": "sync", "resume": "resume", "journal": "journal",
          "triggers": "triggers", "data": "data", "release": "release", "colabkit": None}


def magic_form(line: str) -> str:
    """``airlock pull v01`` -> ``%airlock pull v01``; a command without a magic of its own runs under
    ``%colabkit``: ``config show`` -> ``%colabkit config show``."""
    head = line.split(" ", 1)[0]
    return f"%{line}" if MAGICS.get(head) == head else f"%colabkit {line}"


def magic_prog(command: str) -> str:
    """The program name a command's usage and errors show inside IPython: ``%train``, ``%colabkit config``."""
    return magic_form(command)


class ArgumentError(Exception):
    """argparse rejected the arguments (the message is argparse's, prefixed by the command).

    ``parser`` is the (sub)command's parser; ``missing_command`` is True when what was missing is the
    subcommand itself (``colabkit sync`` without an action), so the front end can show that parser's help.
    """

    def __init__(self, message: str, *, parser: argparse.ArgumentParser | None = None,
                 missing_command: bool = False) -> None:
        super().__init__(message)
        self.parser = parser
        self.missing_command = missing_command


class HelpShown(Exception):
    """``-h``/``--help`` printed the help text."""


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so a magic never kills the kernel."""

    def error(self, message: str) -> None:  # type: ignore[override]
        missing = any(isinstance(a, argparse._SubParsersAction) and a.required
                      and message == f"the following arguments are required: {a.metavar or a.dest}"
                      for a in self._actions)
        raise ArgumentError(f"{self.prog}: {message}", parser=self, missing_command=missing)

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            self._print_message(message, sys.stderr)
        raise HelpShown()


@dataclass
class Context:
    """How a handler talks to the user: lines of text, or one JSON document with ``--json``.

    Attributes:
        json: print machine-readable JSON instead of text.
        notebook: running inside a notebook cell (widgets and live output are available).
        shell: the IPython shell, when called from a magic.
        config_path: ``--config`` given on the command line.
    """

    json: bool = False
    notebook: bool = False
    shell: Any = None
    config_path: str | None = None
    stdout: Callable[[str], None] = field(default=lambda s: print(s, flush=True))
    stderr: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr, flush=True))
    _config: Any = None

    def config(self):
        """The effective configuration (loaded once per command)."""
        if self._config is None:
            from ..config import load_config
            self._config = load_config(self.config_path)
        return self._config

    def out(self, text: str = "") -> None:
        """A line for the user (suppressed with --json, where only the JSON document is printed)."""
        if not self.json:
            self.stdout(text)

    def warn(self, text: str) -> None:
        self.stderr(text)

    def emit(self, data: Any, text: str | Iterable[str] | Callable[[], str | Iterable[str]] | None = None) -> None:
        """Render a result: `data` as JSON with --json, else `text` (or a default rendering of `data`)."""
        if self.json:
            self.stdout(json.dumps(data, indent=2, sort_keys=True, default=str))
            return
        if callable(text):
            text = text()
        if text is None:
            text = json.dumps(data, indent=2, sort_keys=True, default=str)
        if isinstance(text, str):
            self.stdout(text)
        else:
            for line in text:
                self.stdout(line)


def common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> argparse.ArgumentParser:
    """Add the options every leaf command takes: --config, and --json for machine-readable output."""
    parser.add_argument("--config", dest="config_path", metavar="PATH", default=argparse.SUPPRESS,
                        help="colabkit.yaml to use (default: found by walking up from the working directory)")
    if json_flag:
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print machine-readable JSON")
    return parser


def duration_arg(value: str) -> float:
    """argparse type for durations: 3600, 90m, 2h."""
    from ..config import parse_duration
    try:
        return parse_duration(value, key="duration")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def size_arg(value: str) -> int:
    """argparse type for sizes: 20GB, 512MiB, 1000000."""
    from ..config import parse_size
    try:
        return parse_size(value, key="size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


class _Commands(argparse._SubParsersAction):
    """The top-level sub-parsers, named as the user calls them (``%train``, not argparse's ``% train``)."""

    command_prog: Callable[[str], str] | None = None

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if self.command_prog is not None and "prog" not in kwargs:
            kwargs["prog"] = self.command_prog(name)
        return super().add_parser(name, **kwargs)


def build_parser(prog: str = "colabkit", *, command_prog: Callable[[str], str] | None = None) -> ArgumentParser:
    """The full command tree. Command modules are imported here, not at `%load_ext` time.

    Args:
        prog: the program name (``colabkit``, or ``%colabkit`` inside IPython).
        command_prog: the program name of each command (default: ``PROG COMMAND``); the magics pass
            :func:`magic_prog`, so that ``%train --help`` shows ``usage: %train ...``.
    """
    from .. import __version__
    parser = ArgumentParser(prog=prog, description="Train PyTorch from notebooks on machines that can vanish.")
    parser.add_argument("--version", action="version", version=f"colabkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser, action=_Commands)
    sub.command_prog = command_prog
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"colabkit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"colabkit.commands.{name}":
                continue  # a command not built yet
            raise
        module.register(sub)
    return parser


def parse(argv: list[str], *, prog: str = "colabkit",
          command_prog: Callable[[str], str] | None = None) -> argparse.Namespace:
    return build_parser(prog, command_prog=command_prog).parse_args(argv)


def run(args: argparse.Namespace, ctx: Context) -> int:
    """Call the handler a parsed command line selected; return its exit code."""
    ctx.json = bool(getattr(args, "json", False))
    ctx.config_path = getattr(args, "config_path", None)
    func = getattr(args, "func", None)
    if func is None:
        raise ArgumentError(f"colabkit {args.command}: choose a subcommand (see --help)")
    rc = func(args, ctx)
    return int(rc or 0)
