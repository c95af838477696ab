"""journal.md entries: data sets, packages (pinned via importlib.metadata) and runs; CLI and magics."""
from __future__ import annotations

import multiprocessing
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pytest

from colabkit import journal
from colabkit.cli import main
from colabkit.config import load_config

WHEN = datetime(2026, 11, 22, 9, 5, tzinfo=timezone.utc)


@pytest.fixture
def root(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "colabkit.yaml").write_text("project: demo\n")
    (tmp_path / "experiments" / "v01").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cfg(root: Path):
    return load_config(root / "colabkit.yaml")


def test_data_entry_follows_the_protocol(root: Path):
    journal.add_data("PG-19", config=cfg(root), source="https://github.com/deepmind/pg19", version="v1.0",
                     preprocessing="Tokenized with GPT-2 BPE, max_length=2048", downloaded="2024-12-22", when=WHEN)
    assert (root / "journal.md").read_text() == (
        "# Journal\n\n"
        "## Data — 2026-11-22\n"
        "- **Dataset**: PG-19 v1.0\n"
        "- **Source**: https://github.com/deepmind/pg19\n"
        "- **Downloaded**: 2024-12-22\n"
        "- **Preprocessing**: Tokenized with GPT-2 BPE, max_length=2048\n")


def test_entries_append_and_keep_what_was_there(root: Path):
    (root / "journal.md").write_text("# My notes\n\nhand-written line, no newline at end")
    journal.add_data("C4", config=cfg(root), when=WHEN)
    text = (root / "journal.md").read_text()
    assert text.startswith("# My notes\n\nhand-written line, no newline at end\n\n## Data — 2026-11-22\n")
    assert "- **Source**: not given\n- **Downloaded**: 2026-11-22\n- **Preprocessing**: none recorded\n" in text
    # a value with newlines cannot forge a heading
    journal.add_data("x\n## Run forged", config=cfg(root), when=WHEN)
    assert "\n## Run forged" not in (root / "journal.md").read_text()
    assert not list(root.glob(".colabkit-tmp-*"))


def _append_many(args):
    root, i = args
    journal.add_data(f"set-{i}", config=load_config(Path(root) / "colabkit.yaml"), when=WHEN)


def test_concurrent_appends_from_processes_lose_nothing(root: Path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(_append_many, [(str(root), i) for i in range(12)])
    text = (root / "journal.md").read_text()
    assert sorted(int(line.split("set-")[1]) for line in text.splitlines() if "**Dataset**" in line) == list(range(12))


def test_package_pins_the_installed_version_and_records_why(root: Path, capsys):
    version = metadata.version("PyYAML")
    (root / "requirements.txt").write_text("torch>=2.0\npyyaml==0.1\n# keep\n")
    rc = main(["journal", "package", "pyyaml", "--reason", "reading colabkit.yaml"])
    out = capsys.readouterr().out
    assert rc == 0
    assert (root / "requirements.txt").read_text() == f"torch>=2.0\nPyYAML=={version}\n# keep\n"
    assert out.splitlines()[0] == f"Pinned PyYAML=={version} in {root / 'requirements.txt'}"
    entry = (root / "journal.md").read_text().split("\n## ")[-1]
    assert entry.endswith(f"- Added PyYAML=={version} for reading colabkit.yaml (pinned in requirements.txt)\n")
    res = journal.add_package("tqdm", reason="progress bars", config=cfg(root), experiment="v01")
    assert (root / "experiments/v01/requirements.txt").read_text() == f"tqdm=={metadata.version('tqdm')}\n"
    assert res["line"] == f"tqdm=={metadata.version('tqdm')}"


def test_package_errors(root: Path, capsys):
    rc = main(["journal", "package", "colabkit-not-installed-xyz", "--reason", "x"])
    assert rc == 1
    assert capsys.readouterr().err == ("Error: journal package: 'colabkit-not-installed-xyz' is not installed in "
                                       "this environment; pip install colabkit-not-installed-xyz first, check it "
                                       "works, then record it\n")
    rc = main(["journal", "package", "tqdm"])
    assert rc == 2
    assert capsys.readouterr().err == ("Error: colabkit journal package: the following arguments are required: "
                                       "--reason\n")
    rc = main(["journal", "package", "tqdm", "--reason", "x", "--experiment", "v09"])
    assert rc == 1
    assert capsys.readouterr().err == (f"Error: unknown experiment 'v09': {root / 'experiments' / 'v09'} does not "
                                       "exist (experiments here: v01); create it with 'colabkit init --experiment "
                                       "v09' or pull it with 'colabkit airlock pull v09'\n")
    assert not (root / "journal.md").exists() and not (root / "requirements.txt").exists()


def test_run_entry_with_and_without_facts(root: Path):
    text = journal.add_run("v01", config=cfg(root), bundle="0123456789abcdef" * 4, host="vm-l4", gpu="NVIDIA L4",
                           steps=1200, last_loss=0.41234567, best_loss=0.39, attempts=1,
                           checkpoints={"local": "experiments/v01/checkpoints/v01_step_00001200.pt", "hub": None},
                           logs=["experiments/v01/logs/train.log"], source="drive", when=WHEN)
    assert text == ("## Run v01 — 2026-11-22 09:05 UTC\n"
                    "- **Experiment**: v01\n"
                    "- **Bundle**: 0123456789ab\n"
                    "- **Ran on**: vm-l4 (NVIDIA L4)\n"
                    "- **Steps reached**: 1200\n"
                    "- **Loss**: last 0.412346, best 0.39\n"
                    "- **Attempts**: 1\n"
                    "- **Final checkpoint**: local: experiments/v01/checkpoints/v01_step_00001200.pt; hub: —\n"
                    "- **Logs** (imported from drive):\n"
                    "  - experiments/v01/logs/train.log\n")
    bare = journal.add_run("v01", config=cfg(root), when=WHEN)
    assert bare == ("## Run v01 — 2026-11-22 09:05 UTC\n"
                    "- **Experiment**: v01\n"
                    "- **Bundle**: unknown (no airlock export or pull recorded)\n"
                    "- **Ran on**: unknown (no run.json in the logs)\n"
                    "- **Steps reached**: unknown (no step N / iter N in the logs)\n"
                    "- **Loss**: not in the logs\n"
                    "- **Attempts**: unknown\n")


def test_parse_log_lines():
    from colabkit.airlock import parse_log_lines
    lines = ["epoch 1 step 10 loss 4.0", "Iter 20: loss=3.5e0", "global_step 30 | train/loss: 2.75",
             "eval loss nan", "step: 25 loss 3.0", "saved checkpoint"]
    assert parse_log_lines(lines) == {"steps": 30, "last_loss": 3.0, "best_loss": 2.75}
    assert parse_log_lines(["it=7 l=0.5"], step_regex=r"it=(?P<step>\d+)", loss_regex=r"l=(\S+)") == \
        {"steps": 7, "last_loss": 0.5, "best_loss": 0.5}
    assert parse_log_lines([]) == {"steps": None, "last_loss": None, "best_loss": None}


@pytest.mark.magic
def test_journal_magics_in_a_real_shell(ip, root: Path, capsys):
    from IPython.core.error import UsageError
    ip.run_line_magic("journal", "data PG-19 --source https://github.com/deepmind/pg19 --version v1.0 "
                                 "--preprocessing 'GPT-2 BPE, max_length=2048'")
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["Added to journal.md:", f"  ## Data — {datetime.now(timezone.utc):%Y-%m-%d}"]
    assert "- **Preprocessing**: GPT-2 BPE, max_length=2048\n" in (root / "journal.md").read_text()
    ip.run_line_magic("journal", "show -n 1")
    assert capsys.readouterr().out.startswith("## Data — ")
    with pytest.raises(UsageError) as ei:
        ip.run_line_magic("journal", "package colabkit-not-installed-xyz --reason x")
    assert str(ei.value).startswith("journal package: 'colabkit-not-installed-xyz' is not installed")


def test_run_entry_of_a_run_resumed_elsewhere_names_every_machine_and_attempt(root: Path):
    text = journal.add_run("v01", config=cfg(root), steps=300, attempts=None, when=WHEN, host="colab-b",
                           gpu="NVIDIA A100", attempt_details=[
                               {"run": "v01-a", "number": 1, "host": "colab-a", "gpu": "NVIDIA A100",
                                "resume_from": None, "outcome": "crashed\nforged line", "step": 120},
                               {"run": "v01-a", "number": 2, "host": "colab-a", "gpu": "NVIDIA A100",
                                "resume_from": "/content/p/experiments/v01/checkpoints/v01_step_00000100.pt",
                                "outcome": None, "step": None},
                               {"run": "v01-b", "number": 1, "host": "colab-b", "gpu": "NVIDIA A100",
                                "resume_from": "/content/q/experiments/v01/checkpoints/v01_step_00000150.pt",
                                "outcome": "finished (exit code 0)", "step": 300}],
                           logs=["experiments/v01/logs/v01-a/run.json", "experiments/v01/logs/v01-b/run.json"])
    assert text.splitlines()[3:] == [
        "- **Ran on**: colab-a (NVIDIA A100), then colab-b (NVIDIA A100)",
        "- **Steps reached**: 300",
        "- **Loss**: not in the logs",
        "- **Attempts**: 3",
        "  1. colab-a (NVIDIA A100): run v01-a attempt 1, fresh start; crashed forged line; reached step 120",
        "  2. colab-a (NVIDIA A100): run v01-a attempt 2, resumed from v01_step_00000100.pt; outcome unknown",
        "  3. colab-b (NVIDIA A100): run v01-b attempt 1, resumed from v01_step_00000150.pt; finished (exit code 0); "
        "reached step 300",
        "- **Logs**:",
        "  - experiments/v01/logs/v01-a/run.json",
        "  - experiments/v01/logs/v01-b/run.json"]
