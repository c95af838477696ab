"""Project templates and ``colabkit init``: scaffold a project that never overwrites a file.

The templates are the files in the repository's top-level ``templates/`` folder (the folder a reader opens to
see what ``colabkit init`` creates). A wheel ships them inside the package as ``colabkit/_templates/`` (the
``package-dir`` mapping in pyproject.toml); a checkout (``pip install -e .`` or the tree on ``PYTHONPATH``)
reads them from ``templates/`` itself. :func:`scaffold` copies them into a project::

    <dir>/colabkit.yaml             annotated configuration
    <dir>/journal.md                the run / data / package journal
    <dir>/.gitignore                ignores .secrets/, .colabkit/, logs and checkpoints
    <dir>/notebook.ipynb            the Colab / VS Code notebook: pull, resume, %train, sync
    <dir>/experiments/<vXX>/train.py          a small deterministic PyTorch script using colabkit.Checkpointer
    <dir>/experiments/<vXX>/requirements.txt
    <dir>/experiments/<vXX>/models/__init__.py

``{{project}}``, ``{{experiment}}``, ``{{date}}`` and ``{{colabkit_git_url}}`` in the templates are filled in; any other ``{{name}}``
left in a template is an error (:class:`InitError`), never written into a project.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, InitError  # noqa: F401  (InitError: re-exported)

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
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
#: in a wheel: the templates as package data; in a checkout: the repository's top-level templates/
_PACKAGED = Path(__file__).resolve().parent / "_templates"
_SOURCE = Path(__file__).resolve().parent.parent / "templates"


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


def template_dir() -> Path:
    """The folder holding the templates: ``colabkit/_templates`` in a wheel, else the checkout's ``templates/``.

    Raises:
        InitError: neither exists (a broken installation).
    """
    for d in (_PACKAGED, _SOURCE):
        if (d / "colabkit.yaml").is_file():
            return d
    raise InitError(f"colabkit's project templates are missing (looked in {_PACKAGED} and {_SOURCE}); "
                    "reinstall colabkit from its git URL or a checkout")


def template_path(name: str) -> Path:
    """A file-system path of the template `name` (``train.py``, ``notebook.ipynb``, ...)."""
    p = template_dir() / name
    if not p.is_file():
        raise InitError(f"no template named {name!r} in {p.parent}; templates: "
                        f"{', '.join(sorted(x.name for x in p.parent.iterdir() if x.is_file()))}")
    return p


def template_text(name: str) -> str:
    """The text of the template `name` (``train.py``, ``journal.md``, ``colabkit.yaml``, ``gitignore``, ...)."""
    return template_path(name).read_text(encoding="utf-8")


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
    from . import GIT_URL
    values = {"project": name, "experiment": experiment, "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "colabkit_git_url": GIT_URL}
    out = ScaffoldResult(root=root, experiment=experiment)
    for tpl, rel in FILES.items():
        dest = root / rel.format(experiment=experiment)
        if dest.exists() or dest.is_symlink():
            out.skipped.append(dest)
            continue
        text = _MODELS_INIT if tpl is None else _fill(template_text(tpl), values, name=tpl)
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
        from .config import load_config
        try:
            load_config(cfg)
        except ConfigError as e:  # the template itself is broken: a bug, say so plainly
            raise InitError(f"the colabkit.yaml template does not load ({e}); please report this") from None
    return out


def render(name: str, **values: str) -> str:
    """The template `name` with its ``{{placeholders}}`` filled from `values`.

    Raises:
        InitError: a placeholder of the template has no value (it would be written as ``{{name}}``).
    """
    return _fill(template_text(name), values, name=name)


def _fill(text: str, values: dict[str, str], *, name: str = "template") -> str:
    missing: list[str] = []

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key in values:
            return values[key]
        missing.append(key)
        return m.group(0)
    out = _PLACEHOLDER.sub(sub, text)
    if missing:
        raise InitError(f"the {name} template has placeholders nothing fills in: "
                        f"{', '.join('{{' + k + '}}' for k in dict.fromkeys(missing))}; "
                        f"known: {', '.join('{{' + k + '}}' for k in values)} (please report this)")
    return out

