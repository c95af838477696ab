"""The default flow keeps the disk clean: after each verified upload the sync tick deletes local checkpoints
beyond retention.keep_local that the required tiers hold (colabkit.retention's rule), so a %train run of
the template (which passes no keep= to its Checkpointer) does not keep every checkpoint until the disk fills."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from colabkit import sync
from colabkit.config import load_config
from colabkit.templates import template_path
from tests.test_sync import ckpt, make_project, remote_files, sha, wait_for


def _local(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_sync_tick_prunes_beyond_keep_local_after_each_verified_upload(tmp_path):
    root = make_project(tmp_path, retention={"keep_local": 2})
    try:
        cfg = load_config(start=root)
        g = sync.start(config=cfg, every=0.1)
        made = []
        for step in (100, 200, 300):
            made.append(ckpt(root, step))
            wait_for(lambda: g.status()["tiers"]["backup"]["pending_files"] == 0
                     and f"checkpoints/{made[-1].name}.json" in remote_files(tmp_path / "remote_backup"),
                     what=f"step {step} uploaded")
        wait_for(lambda: _local(root / "checkpoints") == [
            "v01_step_00000200.pt", "v01_step_00000200.pt.json", "v01_step_00000300.pt", "v01_step_00000300.pt.json"],
            what="step 100 pruned after step 300 was uploaded")
        # what was deleted locally is on the tier, verified
        assert remote_files(tmp_path / "remote_backup")["checkpoints/v01_step_00000100.pt"] == \
            sha(tmp_path / "remote_backup" / "checkpoints" / "v01_step_00000100.pt")
        # the deletion is logged just after the files go: wait for the line rather than race it
        log = root / ".colabkit" / "logs" / "sync.log"
        wait_for(lambda: "v01_step_00000100.pt (step 100): verified copies in backup" in log.read_text(),
                 what="the deletion in sync.log")
        assert "deleted local checkpoint " in log.read_text()
    finally:
        sync.stop(flush=False)


def test_a_checkpoint_no_tier_holds_is_never_pruned(tmp_path):
    """retention.require_remote names a tier that cannot upload: nothing is deleted however many there are."""
    root = make_project(tmp_path, tiers=[
        {"name": "backup", "remote": "local", "path": str(tmp_path / "remote_backup"), "every": 0.1},
        {"name": "weights", "remote": "local", "path": str(tmp_path / "w"), "every": 0.1, "include": ["*.log"]}],
        retention={"keep_local": 1, "require_remote": ["backup", "weights"]})
    try:
        g = sync.start(config=load_config(start=root))
        for step in (1, 2, 3):
            ckpt(root, step)
        wait_for(lambda: len(remote_files(tmp_path / "remote_backup")) == 6 and
                 g.status()["tiers"]["backup"]["pending_files"] == 0, what="the backup tier holding all three")
        assert sync.flush(timeout=20)["ok"]
        assert len(_local(root / "checkpoints")) == 6
    finally:
        sync.stop(flush=False)


def test_train_run_of_the_template_keeps_only_keep_local_checkpoints(tmp_path):
    root = tmp_path / "proj"
    exp = root / "experiments" / "v01"
    exp.mkdir(parents=True)
    shutil.copy(template_path("train.py"), exp / "train.py")
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "project": "t", "retention": {"keep_local": 2},
        "tiers": [{"name": "weights", "remote": "local", "path": str(tmp_path / "hub"), "every": "1s",
                   "include": ["*.pt", "*.pt.json"]}],
        "sync": {"settle": "0.2s"},
        "train": {"max_restarts": 0, "min_free_disk": "1MB"}}))
    r = subprocess.run([sys.executable, "-m", "colabkit", "train", "v01", "--resume", "none", "--",
                        "--steps", "300", "--save-every", "50", "--step-delay", "0.01"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = [50, 100, 150, 200, 250, 300]
    held = remote_files(tmp_path / "hub")
    assert sorted(held) == sorted([f"experiments/v01/checkpoints/v01_step_{s:08d}.pt" for s in steps]
                                  + [f"experiments/v01/checkpoints/v01_step_{s:08d}.pt.json" for s in steps])
    local = [n for n in _local(exp / "checkpoints") if n != "latest"]
    assert local == ["v01_step_00000250.pt", "v01_step_00000250.pt.json",
                     "v01_step_00000300.pt", "v01_step_00000300.pt.json"]
    for n in local:
        assert sha(exp / "checkpoints" / n) == held[f"experiments/v01/checkpoints/{n}"]
