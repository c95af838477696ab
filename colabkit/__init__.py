"""colabkit: train PyTorch from notebooks on machines that can vanish.

Public names are loaded lazily (PEP 562), so ``import colabkit`` and ``%load_ext colabkit`` stay light:
neither imports torch, googleapiclient, huggingface_hub, watchdog or ipywidgets.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .secrets import install_log_redaction as _install_log_redaction

_install_log_redaction()  # defence in depth: no colabkit log record ever carries a key or token

_LAZY = {
    "Checkpointer": ("colabkit.checkpoints", "Checkpointer"),
    "load_config": ("colabkit.config", "load_config"),
    "Config": ("colabkit.config", "Config"),
    "ColabkitError": ("colabkit.errors", "ColabkitError"),
    "open_remote": ("colabkit.remotes", "open_remote"),
}
_SUBMODULES = {"sync", "resume", "airlock", "journal", "runner", "checkpoints", "config", "errors", "remotes",
               "runtime", "secrets", "dashboard", "triggers", "events", "fsutil", "distributed"}

if TYPE_CHECKING:  # a mirror for type checkers and IDEs
    from . import (airlock, checkpoints, config, distributed, errors, journal, remotes, resume, runner, runtime,
                   sync, triggers)
    from .checkpoints import Checkpointer
    from .config import Config, load_config
    from .errors import ColabkitError
    from .remotes import open_remote

__all__ = ["__version__", *sorted(_LAZY), *sorted(_SUBMODULES)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"colabkit.{name}")
    raise AttributeError(f"module 'colabkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext colabkit``: registers %airlock, %train, %sync, %resume, %journal, %triggers and %colabkit."""
    from .magics import load
    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload
    unload(ipython)
