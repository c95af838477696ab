"""colabkit: train PyTorch from notebooks on machines that can vanish.

Public names are loaded lazily (PEP 562), so ``import colabkit`` and ``%load_ext colabkit`` stay light:
neither imports torch, googleapiclient, huggingface_hub, watchdog or ipywidgets.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Where colabkit is installed from: its git URL, until the distribution has a name of its own (the name
#: `colabkit` on PyPI is an unrelated project: never install that bare name). PLACEHOLDER: the repository's
#: real address was not known when this was written; replace OWNER here, and tests/test_notebooks.py checks
#: that every notebook (notebooks/*.ipynb, templates/notebook.ipynb through {{colabkit_git_url}}) agrees.
GIT_URL = "https://github.com/OWNER/colabkit"

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
               "runtime", "secrets", "dashboard", "triggers", "events", "fsutil", "distributed", "data", "release"}

if TYPE_CHECKING:  # a mirror for type checkers and IDEs
    from . import (airlock, checkpoints, config, data, distributed, errors, journal, release, remotes, resume,
                   runner, runtime, sync, triggers)
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
    """``%load_ext colabkit``: registers %airlock, %train, %sync, %resume, %triggers, %data, %release, %journal
    and %colabkit."""
    from .magics import load
    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload
    unload(ipython)
