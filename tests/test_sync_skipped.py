"""What a tier will never upload is reported as skipped, with the reason, and never counted as pending:
latest_only (an older checkpoint than one the tier holds or is about to upload) and max_file_size (the
checkpoint and its manifest with it). A flush never waits for them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from colabkit import sync
from colabkit.commands.sync import tier_lines
from colabkit.config import load_config
from tests.test_sync import age, ckpt, make_project, remote_files, wait_for

REPO = Path(__file__).resolve().parents[1]


def test_pending_counts_only_what_latest_only_will_upload(tmp_path):
    """issue 9: `%sync status` said `hub: pending 2 files`, then `%sync stop` said `uploaded 0 · pending 0`."""
    root = make_project(tmp_path, tiers=[
        {"name": "hub", "remote": "local", "path": str(tmp_path / "w"), "every": "1h",
         "include": ["*.pt", "*.pt.json"], "latest_only": True}])
    try:
        cfg = load_config(start=root)
        ckpt(root, 300)
        g = sync.start(config=cfg)
        wait_for(lambda: g.status()["tiers"]["hub"]["uploaded"] == 2, what="the first tick's upload")
        ckpt(root, 200)     # older than what the tier holds: latest_only never uploads it
        st = wait_for(lambda: (t := g.status()["tiers"]["hub"])["skipped"] == 2 and t,
                      what="the older checkpoint seen as skipped")
        assert st["pending_files"] == 0
        assert st["skipped_files"] == {
            "checkpoints/v01_step_00000200.pt": "latest_only: step 300 is newer",
            "checkpoints/v01_step_00000200.pt.json": "latest_only: step 300 is newer"}
        line = next(tier_lines({"hub": st}))
        assert " · pending 0 files / 0 B · uploaded 2 · skipped 2 (latest_only: step 300 is newer: " \
               "checkpoints/v01_step_00000200.pt, checkpoints/v01_step_00000200.pt.json)" in line
        # two newer ones before the tier is due: only the newest (and its manifest) is pending
        ckpt(root, 400)
        ckpt(root, 500)
        st = wait_for(lambda: (t := g.status()["tiers"]["hub"])["pending_files"] == 2
                      and t["skipped"] == 4 and t, what="step 400 skipped in favour of 500")
        assert st["skipped_files"]["checkpoints/v01_step_00000400.pt"] == "latest_only: step 500 is newer"
        res = sync.stop()
        assert res["ok"]
        t = res["tiers"]["hub"]
        assert (t["uploaded"], t["pending_files"], t["skipped"]) == (4, 0, 4)
        assert sorted(remote_files(tmp_path / "w")) == [
            "checkpoints/v01_step_00000300.pt", "checkpoints/v01_step_00000300.pt.json",
            "checkpoints/v01_step_00000500.pt", "checkpoints/v01_step_00000500.pt.json"]
    finally:
        sync.stop(flush=False)


def test_a_checkpoint_over_max_file_size_is_skipped_with_its_manifest_and_once_returns(tmp_path):
    """issue 16 §5: the manifest of a skipped checkpoint waited for it for the whole flush timeout."""
    root = make_project(tmp_path, tiers=[
        {"name": "assets", "remote": "local", "path": str(tmp_path / "d"), "every": "1h",
         "include": ["**"], "max_file_size": "1KB"}], sync_cfg={"flush_timeout": "60s"})
    big = ckpt(root, 100, size=5000)
    log_file = root / "logs" / "train.log"
    log_file.write_text("step 100\n")
    age(log_file)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "colabkit", "sync", "once", "--config", str(root / "colabkit.yaml")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines == [
        "assets: ok · uploaded 1 · pending 0 · skipped 2 (larger than max_file_size (1.0 KB): "
        "checkpoints/v01_step_00000100.pt; the manifest of a skipped checkpoint: "
        "checkpoints/v01_step_00000100.pt.json)",
        "sync once: everything due is uploaded (2 skipped: see above)"]
    assert sorted(remote_files(tmp_path / "d")) == ["logs/train.log"]
    assert big.exists()
    # the same through the API, in this process
    res = sync.once(config=load_config(start=root), timeout=60)
    assert res["ok"] and res["tiers"]["assets"]["state"] != "timeout"
    assert res["tiers"]["assets"]["skipped_files"] == {
        "checkpoints/v01_step_00000100.pt": "larger than max_file_size (1.0 KB)",
        "checkpoints/v01_step_00000100.pt.json": "the manifest of a skipped checkpoint"}


@pytest.mark.magic
def test_magic_status_and_stop_agree_on_pending_and_say_skipped(tmp_path, ip, capsys, monkeypatch):
    """issue 9, as a user saw it: `%sync status` said `hub: pending 2 files`, `%sync stop` `uploaded 0 · pending 0`."""
    root = make_project(tmp_path, tiers=[
        {"name": "hub", "remote": "local", "path": str(tmp_path / "w"), "every": "1h",
         "include": ["*.pt", "*.pt.json"], "latest_only": True}])
    monkeypatch.chdir(root)
    ckpt(root, 300)
    try:
        ip.run_line_magic("sync", "start")
        capsys.readouterr()
        wait_for(lambda: sync.status()["tiers"]["hub"]["uploaded"] == 2, what="the first tick's upload")
        ckpt(root, 200)
        wait_for(lambda: sync.status()["tiers"]["hub"]["skipped"] == 2, what="the older checkpoint skipped")
        ip.run_line_magic("sync", "status")
        (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("hub: ")]
        assert " · pending 0 files / 0 B · uploaded 2 · skipped 2 (latest_only: step 300 is newer: " in line
        ip.run_line_magic("sync", "stop")
        out = capsys.readouterr().out.splitlines()
        assert out == ["hub: ok · uploaded 2 · pending 0 · skipped 2 (latest_only: step 300 is newer: "
                       "checkpoints/v01_step_00000200.pt, checkpoints/v01_step_00000200.pt.json)",
                       "stopped: everything due is uploaded (2 skipped: see above)"]
    finally:
        sync.stop(flush=False)
