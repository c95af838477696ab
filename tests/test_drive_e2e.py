"""End to end through the Drive tier (DriveRemote against tests/drive_server.py): airlock export and pull,
log import, resume from Drive onto an empty disk, and the sync engine uploading to Drive (kill -9 and restart).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from colabkit import airlock, resume, sync
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


# -- the sync engine uploading to Drive ---------------------------------------------------------------
SYNC_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from colabkit import sync
from colabkit.config import load_config
cfg = load_config(data=json.loads({cfg!r}), start={root!r})
res = sync.once(config=cfg)
print(json.dumps({{"ok": res["ok"]}}), flush=True)
"""


def _sync_project(tmp_path: Path, srv: DriveServer) -> tuple[Path, dict]:
    folder = srv.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = srv.write_service_account(tmp_path / "keys" / "sa.json")
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "logs").mkdir()
    data = {"drive": {"folder_id": folder, "credentials": str(key), "endpoint": srv.endpoint, "chunk_size": "8MiB"},
            "tiers": [{"name": "drive", "remote": "drive", "include": ["**"], "exclude": []}],
            "sync": {"settle": 0}}
    return root, data


def test_sync_engine_resumes_a_killed_large_upload_from_its_ledger(drive_server: DriveServer, tmp_path: Path):
    root, data = _sync_project(tmp_path, drive_server)
    big = root / "checkpoints" / "model.bin"
    with open(big, "wb") as f:
        for _ in range(9):
            f.write(os.urandom(8 << 20))          # 72 MiB: over the 64 MiB that keeps its session
    (root / "logs" / "train.log").write_text("step 1 loss 3.0\n")
    script = tmp_path / "sync_child.py"
    script.write_text(SYNC_CHILD.format(repo=str(Path(__file__).resolve().parents[1]), cfg=json.dumps(data),
                                        root=str(root)))
    drive_server.pause_at = 40 << 20
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert drive_server.paused.wait(60), "the upload never got going"
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        child.stderr.close()
        drive_server.gate.set()
    before = len(drive_server.content_ranges)
    again = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {"ok": True}
    assert "BEGIN PRIVATE KEY" not in again.stderr and not any(t in again.stderr for t in drive_server.issued_tokens)
    puts = [cr for cr in drive_server.content_ranges[before:] if not cr.startswith("bytes */")]
    first = [cr for cr in puts if cr.endswith(f"/{9 * (8 << 20)}")][0]
    assert int(first.split()[1].split("-")[0]) >= 32 << 20, "the restarted sync began the upload again from 0"
    folder = data["drive"]["folder_id"]
    copies = [f for f in drive_server.files.values() if f.name == "model.bin"]
    assert len(copies) == 1 and copies[0].md5 == hash_file(big).md5
    assert drive_server.content(drive_server.find("logs/train.log", root=folder).id) == b"step 1 loss 3.0\n"


def test_sync_engine_updates_a_growing_log_in_place(drive_server: DriveServer, tmp_path: Path):
    root, data = _sync_project(tmp_path, drive_server)
    cfg = load_config(data=data, start=root)
    log = root / "logs" / "train.log"
    log.write_text("step 1 loss 3.0\n")
    assert sync.once(config=cfg)["ok"]
    first = drive_server.find("logs/train.log", root=data["drive"]["folder_id"])
    with open(log, "a") as f:
        f.write("step 2 loss 2.5\n")
    assert sync.once(config=cfg)["ok"]
    again = drive_server.find("logs/train.log", root=data["drive"]["folder_id"])
    assert again.id == first.id
    assert drive_server.content(again.id) == b"step 1 loss 3.0\nstep 2 loss 2.5\n"
    assert len([f for f in drive_server.files.values() if f.name == "train.log"]) == 1
