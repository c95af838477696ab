"""End to end through the Drive tier (DriveRemote against tests/drive_server.py): airlock export and pull,
log import, and resume from Drive onto an empty disk. The sync engine's variant is not here yet: colabkit/sync.py
did not exist when this was written."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from colabkit import airlock, resume
from colabkit.config import load_config
from colabkit.fsutil import hash_file
from colabkit.remotes import open_remote

from .drive_server import DriveServer, drive_server  # noqa: F401  (fixture)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def project(tmp_path: Path, drive_server: DriveServer) -> Path:
    """A git repo with experiments/v01 committed, whose drive tier is a Shared Drive folder on the test server."""
    folder = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    root = tmp_path / "proj"
    e = root / "experiments" / "v01"
    (e / "models").mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "Test")
    git(root, "config", "commit.gpgsign", "false")
    (e / "train.py").write_text("print('step 1 loss 0.5')\n")
    (e / "models" / "net.py").write_text("class Net:\n    pass\n")
    (e / "requirements.txt").write_text("")
    (root / ".gitignore").write_text("logs/\ncheckpoints/\n.colabkit/\n")
    (root / "colabkit.yaml").write_text(
        f"drive:\n  folder_id: {folder}\n  credentials: {key}\n  endpoint: {drive_server.endpoint}\n"
        "tiers:\n  - name: drive\n    remote: drive\nresume:\n  priority: [local, drive]\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "v01")
    return root


def test_airlock_export_and_pull_through_drive(project: Path, drive_server: DriveServer, tmp_path: Path):
    cfg = load_config(project / "colabkit.yaml")
    out = airlock.export("v01", config=cfg)
    assert out["uploaded"] and out["remote"] == "drive"
    bundles = [f for f in drive_server.files.values() if f.name.endswith(".zip")]
    assert len(bundles) == 1
    # the cluster: an empty checkout with the same configuration
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    shutil.copy(project / "colabkit.yaml", cluster / "colabkit.yaml")
    got = airlock.pull("v01", config=load_config(cluster / "colabkit.yaml"))
    for rel in ("train.py", "models/net.py", "requirements.txt"):
        assert (cluster / "experiments" / "v01" / rel).read_bytes() == (project / "experiments" / "v01" / rel).read_bytes()
    assert got["experiment"] == "v01"


def test_import_logs_from_drive(project: Path, drive_server: DriveServer, tmp_path: Path):
    cfg = load_config(project / "colabkit.yaml")
    remote = open_remote(cfg, "drive")
    log = tmp_path / "train.log"
    log.write_text("step 100 loss 2.5\nstep 200 loss 1.75\n")
    remote.put(log, "experiments/v01/logs/train.log")
    remote.close()
    res = airlock.import_logs("v01", config=cfg, journal=False)
    assert [f["status"] for f in res["files"]] == ["imported"]
    assert (project / "experiments" / "v01" / "logs" / "train.log").read_text() == log.read_text()


def test_resume_from_drive_onto_an_empty_disk(project: Path, drive_server: DriveServer):
    import torch
    from colabkit.checkpoints import Checkpointer
    cfg = load_config(project / "colabkit.yaml")
    ckdir = cfg.checkpoint_dir("v01")
    saved = Checkpointer(ckdir, prefix="v01").save(1200, {"w": torch.arange(10.0)})
    remote = open_remote(cfg, "drive")
    for p in sorted(ckdir.iterdir()):
        if p.is_file() and p.name.startswith("v01_step_"):
            remote.put(p, cfg.remote_path(p))
    remote.close()
    digest = hash_file(saved)
    shutil.rmtree(ckdir)                       # the VM is gone: nothing local
    plan, path = resume.resume(config=cfg, experiment="v01", progress=False)
    assert plan.choice.source == "drive" and plan.choice.step == 1200
    assert path == saved and hash_file(path) == digest
    assert torch.load(path, weights_only=True)["w"].tolist() == list(range(10))
