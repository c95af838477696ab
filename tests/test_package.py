"""The package itself: light to load, one parser for CLI and magics, clear errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

from colabkit.cli import main

HEAVY = ("torch", "googleapiclient", "huggingface_hub", "watchdog", "ipywidgets")


def test_load_ext_imports_nothing_heavy():
    code = textwrap.dedent(f"""
        import sys
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_line_magic("load_ext", "colabkit")
        assert "sync" in ip.magics_manager.magics["line"], "magics not registered"
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        print("HEAVY=" + ",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout, f"%load_ext colabkit imported: {out.stdout}"


def test_cli_version_and_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("init", "demo", "airlock", "train", "sync", "resume", "journal", "status", "config"):
        assert re.search(rf"^\s+{cmd}\s", out, re.M), f"{cmd} missing from colabkit --help"


def test_cli_bad_config_names_key_path(tmp_path, capsys):
    cfg = tmp_path / "colabkit.yaml"
    cfg.write_text("tiers:\n  - name: drive\n  - name: hub\n    every: 3 hourz\n")
    assert main(["config", "check", "--config", str(cfg)]) == 1
    assert capsys.readouterr().err.strip() == \
        "Error: tiers[1].every: '3 hourz' is not a duration; use e.g. 90m or 2h"


def test_cli_missing_subcommand_exits_2(capsys):
    assert main(["config"]) == 2
    assert "the following arguments are required: ACTION" in capsys.readouterr().err


def test_console_script_runs_in_subprocess(tmp_path):
    out = subprocess.run([sys.executable, "-m", "colabkit", "config", "show", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [t["name"] for t in data["tiers"]] == ["drive", "hub"]
    assert data["remotes"]["drive"].startswith("local folder ")


@pytest.mark.magic
def test_magic_config_show_and_usage_error(ip, tmp_path, monkeypatch, capsys):
    from IPython.core.error import UsageError
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # whatever loading the extension printed
    ip.run_line_magic("colabkit", "config show --json")
    data = json.loads(capsys.readouterr().out)
    assert data["resume"]["policy"] == "newest"
    (tmp_path / "colabkit.yaml").write_text("resume:\n  policy: oldest\n")
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("colabkit", "config check")
    assert str(ei.value) == "resume.policy: 'oldest' is not allowed; use one of newest, first"


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def _user_facing_texts():
    """The docs and every message colabkit's code can print (the template notebook is checked by its own tests)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "secrets.example").glob("*.md")),
             *sorted(p for p in (ROOT / "colabkit").rglob("*.py") if "templates" not in p.parts)]
    return [(p.relative_to(ROOT).as_posix(), p.read_text(encoding="utf-8")) for p in files]


def test_nothing_tells_users_to_pip_install_the_unrelated_pypi_colabkit():
    # 'colabkit' on PyPI is someone else's project: an install line may name a path or a git URL, never the bare name
    bad = re.compile(r"pip install(?:\s+-{1,2}[\w-]+)*\s+['\"]?colabkit(?![\w/.\[-])")
    hits = [f"{name}: {m.group(0)}" for name, text in _user_facing_texts() for m in bad.finditer(text)]
    assert hits == []


def test_secrets_example_counts_its_ways_and_never_suggests_a_my_drive_folder_as_editor():
    text = (ROOT / "secrets.example" / "README.md").read_text(encoding="utf-8")
    head = re.search(r"^## 2\. Give colabkit the key — (\w+) ways", text, re.M)
    assert head, "section 2 heading changed"
    section = text[head.end():text.index("\n## 3.")]
    listed = re.findall(r"^(\d+)\. ", section, re.M)
    assert _WORDS[head.group(1)] == len(listed) == int(listed[-1])
    # a service account has no storage quota: a plain (My Drive) folder shared with it fails with storageQuotaExceeded
    assert not re.search(r"share it with\s+`[^`]*gserviceaccount\.com`\s+as\s+\*\*Editor\*\*", text)
    assert "storageQuotaExceeded" in text and "Shared Drive" in text and "authorized_user" in text


def test_bare_colabkit_prints_the_help_and_a_group_without_its_action_shows_that_group(capsys, tmp_path):
    assert main([]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: colabkit [-h] [--version] COMMAND ...\n") and err == ""
    assert re.search(r"^\s+resume\s", out, re.M)
    p = subprocess.run([sys.executable, "-m", "colabkit"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == out and "Error" not in p.stderr
    assert main(["sync"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("usage: colabkit sync [-h] ACTION ...\n")
    assert re.search(r"^\s+flush\s+upload everything due now", err, re.M)
    assert err.endswith("\nError: colabkit sync: the following arguments are required: ACTION\n")


@pytest.mark.magic
def test_magic_help_names_the_magic_and_errors_name_the_form_of_the_notebook(ip, tmp_path, monkeypatch, capsys):
    from IPython.core.error import UsageError
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    ip.run_line_magic("train", "--help")
    assert capsys.readouterr().out.startswith("usage: %train [-h] [--background]")
    ip.run_line_magic("sync", "start --help")
    assert capsys.readouterr().out.startswith("usage: %sync start [-h]")
    ip.run_line_magic("colabkit", "config --help")
    assert capsys.readouterr().out.startswith("usage: %colabkit config [-h]")
    ip.run_line_magic("colabkit", "")
    assert capsys.readouterr().out.startswith("usage: %colabkit [-h] [--version] COMMAND ...\n")
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("sync", "")
    assert str(ei.value) == "%sync: the following arguments are required: ACTION"
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("airlock", "status")
    assert str(ei.value) == (f"no bundle was exported or pulled in {tmp_path.resolve()} yet; run "
                             "'%airlock export vXX' or '%airlock pull vXX'")
    # the same error from the terminal names the terminal's commands
    assert main(["airlock", "status"]) == 1
    assert capsys.readouterr().err == (f"Error: no bundle was exported or pulled in {tmp_path.resolve()} yet; run "
                                       "'colabkit airlock export vXX' or 'colabkit airlock pull vXX'\n")
