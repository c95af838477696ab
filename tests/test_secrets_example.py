"""secrets.example/ holds the shapes of the credentials colabkit reads (all fake). Each one, committed into an
experiment by mistake, must be refused by `%airlock export`: the secret scan catches every shape shown there."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "secrets.example").iterdir() if p.is_file() and p.name != "README.md")
WHY = {"colab-service-account.json": "holds a private-key block",
       "authorized-user.json": "holds an OAuth refresh token or client secret",
       "hf-token": "holds a Hugging Face token"}


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@colabkit.invalid", "-c", "commit.gpgsign=false",
                    "-c", "init.defaultBranch=main", *args], cwd=root, check=True, capture_output=True, timeout=60)


@pytest.fixture
def committed(tmp_path, monkeypatch):
    """A project made by `colabkit init`, under git; returns a function that commits a file into v01."""
    from colabkit.templates import scaffold
    scaffold(tmp_path, experiment="v01")
    _git(tmp_path, "init", "-q")
    monkeypatch.chdir(tmp_path)

    def add(src: Path) -> str:
        dest = tmp_path / "experiments" / "v01" / src.name
        shutil.copyfile(src, dest)
        # -f: the .gitignore `colabkit init` writes keeps key files out of git; this is a project without it
        _git(tmp_path, "add", "-A")
        _git(tmp_path, "add", "-f", str(dest))
        _git(tmp_path, "commit", "-q", "-m", f"add {src.name}")
        return dest.name
    return add


def test_every_file_in_secrets_example_has_its_shape_named():
    assert sorted(p.name for p in EXAMPLES) == sorted(WHY)


@pytest.mark.magic
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_export_refuses_each_secret_shape_of_secrets_example(ip, committed, example):
    from IPython.core.error import UsageError
    from colabkit.config import load_config
    name = committed(example)
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("airlock", "export v01")
    assert str(ei.value) == (
        "refusing to export v01: 1 file(s) are or hold secrets, and secrets never travel; remove them from the "
        f"experiment (or, for a false positive, add them to airlock.exclude):\n  {name} ({WHY[name]})")
    # nothing left for the remote: no bundle of v01 exists
    drive = load_config().home / "remotes" / load_config().project / "drive"
    assert not (drive / "airlock" / "v01").exists()


@pytest.mark.magic
def test_the_readme_about_secrets_is_not_itself_refused(ip, committed, capsys):
    committed(ROOT / "secrets.example" / "README.md")
    ip.run_line_magic("airlock", "export v01")
    assert "uploaded to drive:" in capsys.readouterr().out
