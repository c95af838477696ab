"""colabkit init: scaffolds a project from the templates and never overwrites a file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from colabkit.config import load_config
from colabkit.templates import InitError, scaffold

EXPECTED = ["colabkit.yaml", "journal.md", ".gitignore", "notebook.ipynb", "experiments/v02/train.py",
            "experiments/v02/requirements.txt", "experiments/v02/models/__init__.py"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "colabkit.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_init_scaffolds_then_skips_and_never_overwrites(tmp_path):
    root = tmp_path / "rsm"
    out = cli("init", str(root), "--experiment", "v02", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"project at {root}", *[f"  created  {p}" for p in EXPECTED],
                                       f"next: cd {root} && colabkit train v02 -- --steps 300   "
                                       "(or %train v02 in the notebook)"]
    cfg = load_config(root / "colabkit.yaml")
    assert cfg.project == "rsm"
    assert "# rsm — journal" in (root / "journal.md").read_text()
    assert "- **Experiment**: v02" in (root / "journal.md").read_text()
    assert ".secrets/" in (root / ".gitignore").read_text().splitlines()
    assert "%train v02" in (root / "notebook.ipynb").read_text()

    # a user's edits survive a second init, which lists them as skipped
    (root / "journal.md").write_text("my notes\n")
    (root / "experiments" / "v02" / "train.py").write_text("print('mine')\n")
    (root / "notebook.ipynb").unlink()
    out = cli("init", str(root), "-e", "v02", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "  created  notebook.ipynb" in lines
    assert "  skipped  journal.md (exists; left as it is)" in lines
    assert "  skipped  experiments/v02/train.py (exists; left as it is)" in lines
    assert (root / "journal.md").read_text() == "my notes\n"
    assert (root / "experiments" / "v02" / "train.py").read_text() == "print('mine')\n"
    out = cli("init", "-e", "v02", cwd=root)  # DIR defaults to the working directory
    assert out.stdout.splitlines()[-1] == "nothing to do: every file already exists"


def test_init_json_and_a_second_experiment(tmp_path):
    import json
    out = cli("init", str(tmp_path), "--json", cwd=tmp_path)
    data = json.loads(out.stdout)
    assert data["experiment"] == "v01" and len(data["created"]) == 7 and data["skipped"] == []
    res = scaffold(tmp_path, experiment="v03")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in res.created) == [
        "experiments/v03/models/__init__.py", "experiments/v03/requirements.txt", "experiments/v03/train.py"]
    assert len(res.skipped) == 4


def test_init_bad_inputs(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    out = cli("init", str(f), cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip() == f"Error: {f} is a file, not a folder; pass a folder to scaffold the project in"
    assert f.read_text() == "x"
    with pytest.raises(InitError, match=r"^--experiment '\.\./up' is not a folder name; use e\.g\. v01$"):
        scaffold(tmp_path / "p", experiment="../up")
    assert not (tmp_path / "p").exists()


def test_init_project_trains_end_to_end(tmp_path):
    """The scaffolded project runs as is: `colabkit train v01` on the template (a real torch run)."""
    root = tmp_path / "demo"
    scaffold(root)
    cfgtext = (root / "colabkit.yaml").read_text().replace("min_free_disk: 10GB", "min_free_disk: 1MB")
    (root / "colabkit.yaml").write_text(cfgtext)
    out = cli("train", "v01", "--no-sync", "--", "--steps", "60", "--save-every", "30", cwd=root)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    ck = root.resolve() / "experiments" / "v01" / "checkpoints"
    assert f"saved checkpoint at iteration 60 to {ck / 'v01_step_00000060.pt'}" in lines
    assert lines[-3].startswith("v01: finished · step 60/60 · loss ")
    assert lines[-2] == f"last checkpoint: {ck / 'v01_step_00000060.pt'}"
    # numpy is installed, as on Colab and every VM: torch has no reason to warn in the run's output
    assert "Failed to initialize NumPy" not in out.stdout + out.stderr
