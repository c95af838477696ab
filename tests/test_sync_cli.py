"""`colabkit sync ...` through colabkit.cli.main and a real subprocess, and `%sync ...` on a real IPython shell."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from colabkit import sync
from colabkit.cli import main
from tests.test_sync import ckpt, make_project, remote_files, sha, wait_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    monkeypatch.chdir(root)
    yield root
    sync.stop(flush=False)


def test_cli_once_uploads_and_status_json_in_a_subprocess(project, tmp_path, capsys):
    c = ckpt(project, 5)
    assert main(["sync", "once", "--config", str(project / "colabkit.yaml")]) == 0
    out = capsys.readouterr().out
    assert "backup: ok · uploaded 2 · pending 0" in out
    assert "sync once: everything due is uploaded" in out
    assert remote_files(tmp_path / "remote_backup")[f"checkpoints/{c.name}"] == sha(c)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "colabkit", "sync", "status", "--json"], cwd=project, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["running"] is False
    assert data["ledger"]["backup"]["files"] == 2
    assert data["ledger"]["backup"]["bytes"] == c.stat().st_size + (c.parent / (c.name + ".json")).stat().st_size
    r = subprocess.run([sys.executable, "-m", "colabkit", "sync", "status"], cwd=project, env=env,
                       capture_output=True, text=True, timeout=60)
    assert "sync is not running in this process" in r.stdout
    assert "backup: holds 2 files" in r.stdout


def test_cli_user_errors(project, capsys):
    assert main(["sync", "start"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("Error: 'colabkit sync start' would stop as soon as this command exits; in a terminal use "
                           "'colabkit sync watch' (foreground) or 'colabkit sync once', in a notebook '%sync start'")
    assert main(["sync", "flush"]) == 1
    assert capsys.readouterr().err.strip() == (
        "Error: sync is not running; start it with '%sync start' (or 'colabkit sync once' for one pass)")
    assert main(["sync", "watch", "--every", "soon"]) == 2
    assert capsys.readouterr().err.strip() == (
        "Error: colabkit sync watch: argument --every: 'soon' is not a duration; use e.g. 90m or 2h")
    assert main(["sync", "once", "missing-folder"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"Error: cannot watch {project / 'missing-folder'}: no such file or folder; create it or pass another path")
    assert main(["sync", "stop"]) == 0
    assert capsys.readouterr().out.strip() == "sync is not running; nothing to stop"


@pytest.mark.magic
def test_magic_start_status_flush_stop(project, tmp_path, ip, capsys):
    from IPython.core.error import UsageError
    ip.run_line_magic("sync", "start --every 1h")
    out = capsys.readouterr().out
    assert f"sync started: watching {project / 'checkpoints'}, {project / 'logs'}" in out
    assert "backup: " in out
    wait_for(lambda: sync.status()["tiers"]["backup"]["last_tick"], what="the first tick")
    # re-running the cell replaces the syncers instead of adding more
    ip.run_line_magic("sync", "start --every 1h")
    capsys.readouterr()
    assert [t.name for t in threading.enumerate() if t.name.startswith("colabkit-sync-backup")] == [
        "colabkit-sync-backup"]
    wait_for(lambda: (t := sync.status()["tiers"]["backup"])["last_tick"] and t["state"] == "idle",
             what="the replacement's first tick")
    c = ckpt(project, 9)
    ip.run_line_magic("sync", "status")
    out = capsys.readouterr().out
    assert f"sync running: watching {project / 'checkpoints'}, {project / 'logs'}" in out
    assert "backup: idle" in out
    ip.run_line_magic("sync", "flush --timeout 30")
    out = capsys.readouterr().out
    assert "flush: everything due is uploaded" in out
    assert remote_files(tmp_path / "remote_backup")[f"checkpoints/{c.name}"] == sha(c)
    ip.run_line_magic("sync", "status --json")
    data = json.loads(capsys.readouterr().out)
    assert data["tiers"]["backup"]["uploaded"] == 2 and data["tiers"]["backup"]["pending_files"] == 0
    ip.run_line_magic("sync", "stop")
    assert "stopped: everything due is uploaded" in capsys.readouterr().out
    ip.run_line_magic("sync", "stop")
    assert capsys.readouterr().out.strip() == "sync is not running; nothing to stop"
    assert not any(t.name.startswith("colabkit-sync") for t in threading.enumerate())
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("sync", "start nowhere")
    assert str(e.value) == f"cannot watch {project / 'nowhere'}: no such file or folder; create it or pass another path"
    with pytest.raises(UsageError) as e:
        ip.run_line_magic("sync", "start --every never")
    assert str(e.value) == "%sync start: argument --every: 'never' is not a duration; use e.g. 90m or 2h"
