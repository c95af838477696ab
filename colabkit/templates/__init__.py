"""Project templates and ``colabkit init``: scaffold a project that never overwrites a file.

The files here are package data. :func:`scaffold` copies them into a project::

    <dir>/colabkit.yaml             annotated configuration
    <dir>/journal.md                the run / data / package journal
    <dir>/.gitignore                ignores .secrets/, .colabkit/, logs and checkpoints
    <dir>/notebook.ipynb            the Colab / VS Code notebook: pull, resume, %train, sync
    <dir>/experiments/<vXX>/train.py          a small deterministic PyTorch script using colabkit.Checkpointer
    <dir>/experiments/<vXX>/requirements.txt
    <dir>/experiments/<vXX>/models/__init__.py

``{{project}}``, ``{{experiment}}`` and ``{{date}}`` in the templates are filled in.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InitError  # noqa: F401  (InitError: re-exported)

#: template name -> path in the project ({experiment} is filled in)
FILES = {
    "colabkit.yaml": "colabkit.yaml",
    "journal.md": "journal.md",
    "gitignore": ".gitignore",
    "notebook.ipynb": "notebook.ipynb",
    "train.py": "experiments/{experiment}/train.py",
    "requirements.txt": "experiments/{experiment}/requirements.txt",
    None: "experiments/{experiment}/models/__init__.py",
}
_MODELS_INIT = '"""Model code of this experiment (bundled by %airlock export with train.py)."""\n'
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ScaffoldResult:
    """What :func:`scaffold` did: files written and files left as they were (never overwritten)."""

    root: Path
    experiment: str
    created: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "experiment": self.experiment,
                "created": [str(p) for p in self.created], "skipped": [str(p) for p in self.skipped]}


def template_text(name: str) -> str:
    """The text of the template `name` (``train.py``, ``journal.md``, ``colabkit.yaml``, ``gitignore``, ...)."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def template_path(name: str) -> Path:
    """A file-system path of the template `name` (the package is installed as plain files)."""
    return Path(str(resources.files(__name__).joinpath(name)))


def scaffold(directory: str | os.PathLike | None = None, *, experiment: str = "v01",
             project: str | None = None) -> ScaffoldResult:
    """Create a project from the templates; existing files are left alone and listed as skipped.

    Args:
        directory: the project folder (created if missing; default: the working directory).
        experiment: the first experiment's name (``v01``).
        project: the project name written into colabkit.yaml and journal.md (default: the folder's name).
    Returns:
        A :class:`ScaffoldResult`.
    Raises:
        InitError: `directory` is a file, or the experiment name is not a plain folder name.
    """
    root = Path(directory if directory is not None else os.getcwd()).expanduser().resolve()
    if not _NAME.match(experiment or ""):
        raise InitError(f"--experiment {experiment!r} is not a folder name; use e.g. v01")
    if root.exists() and not root.is_dir():
        raise InitError(f"{root} is a file, not a folder; pass a folder to scaffold the project in")
    name = project or root.name
    if not _NAME.match(name):
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "project"
    values = {"project": name, "experiment": experiment, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    out = ScaffoldResult(root=root, experiment=experiment)
    for tpl, rel in FILES.items():
        dest = root / rel.format(experiment=experiment)
        if dest.exists() or dest.is_symlink():
            out.skipped.append(dest)
            continue
        text = _MODELS_INIT if tpl is None else _fill(template_text(tpl), values)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: a file that appears meanwhile is still never overwritten
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            out.skipped.append(dest)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        out.created.append(dest)
    cfg = root / "colabkit.yaml"
    if cfg in out.created:
        from ..config import load_config
        try:
            load_config(cfg)
        except ConfigError as e:  # the template itself is broken: a bug, say so plainly
            raise InitError(f"the colabkit.yaml template does not load ({e}); please report this") from None
    return out


def _fill(text: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    return text
