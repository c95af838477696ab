"""The built wheel works on its own: built from the checkout, installed with torch into a fresh virtual
environment outside the checkout, where `colabkit init` (the templates travel inside the wheel) and
`colabkit demo` (the whole loop) run with nothing of the checkout on the path."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # as the Makefile installs it: the local CPU wheel where pip's find-links has one
#: pip's own cache, as the developer has it (the tests give HOME a temporary folder, which would make every run
#: download every dependency again); read at import, before the fixtures change HOME
_PIP_CACHE = os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")
_IGNORE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "_work",
                                 ".colabkit", ".pytest_cache", ".hypothesis")


def _source_copy(dest: Path) -> Path:
    """The files a fresh clone would have (tracked and new, not ignored), so nothing built here leaks in."""
    try:
        names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                               capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, ignore=_IGNORE)
        return dest
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
           and not k.startswith("COLABKIT_CONFIG")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_CACHE_DIR"] = _PIP_CACHE
    return env


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_init_and_demo(tmp_path):
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300, env=_env())
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("colabkit-*.whl")

    # every module of the checkout and every template is in the wheel (a subpackage missing from the
    # explicit `packages` list in pyproject.toml would be caught here)
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "colabkit").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules - names == set()
    templates = {f"colabkit/_templates/{p.name}" for p in (ROOT / "templates").iterdir() if p.is_file()}
    assert templates and templates - names == set()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=_env())
    py, cli = venv / "bin" / "python", venv / "bin" / "colabkit"
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", TORCH, str(wheel)], capture_output=True,
                          text=True, timeout=1200, env=_env())
    assert inst.returncode == 0, inst.stderr[-3000:]

    work = tmp_path / "outside"  # neither the checkout nor its copy is on the path or the working directory
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import colabkit, colabkit.templates as t; "
                            "print(colabkit.__file__); print(t.template_dir())"],
                           cwd=work, capture_output=True, text=True, timeout=120, env=_env())
    assert where.returncode == 0, where.stderr
    module, templates_dir = where.stdout.splitlines()
    site = Path(module).parent.parent
    assert site.is_relative_to(venv) and site.name == "site-packages", module
    assert Path(templates_dir) == site / "colabkit" / "_templates"

    init = subprocess.run([str(cli), "init", "proj"], cwd=work, capture_output=True, text=True, timeout=120,
                          env=_env())
    assert init.returncode == 0, init.stderr
    assert "  created  experiments/v01/train.py" in init.stdout.splitlines()
    assert (work / "proj" / "experiments" / "v01" / "train.py").read_text() == \
        (ROOT / "templates" / "train.py").read_text()
    assert "{{" not in (work / "proj" / "notebook.ipynb").read_text()

    demo = subprocess.run([str(cli), "demo", "--dir", str(work / "demo"), "--steps", "100", "--save-every", "25"],
                          cwd=work, capture_output=True, text=True, timeout=600, env=_env())
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "final weights after preemption + resume == uninterrupted run (bit for bit)" in demo.stdout
