"""The Hub tier end to end: real torch checkpoints, the sync engine (colabkit.sync) uploading to the real
Drive remote (google-api-python-client against tests/drive_server.py) and the Hub remote (huggingface_hub
against tests/hub_server.py), then colabkit.resume onto an empty disk.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from colabkit import resume as resume_mod  # noqa: E402
from colabkit import sync  # noqa: E402
from colabkit.checkpoints import Checkpointer  # noqa: E402
from colabkit.config import Config, DriveConfig, HubConfig, ResumeConfig, SyncConfig, TierConfig  # noqa: E402
from colabkit.errors import ResumeError  # noqa: E402
from colabkit.remotes import open_remote  # noqa: E402

from .drive_server import DriveServer, drive_server  # noqa: F401,E402
from .hub_server import HubServer, hub_server  # noqa: F401,E402

REPO = "alice/proj-weights"


@pytest.fixture
def project(tmp_path: Path, hub_server: HubServer, drive_server: DriveServer, monkeypatch) -> Config:
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    root = tmp_path / "proj"
    root.mkdir()
    folder = drive_server.create_folder("colabkit", share_with={drive_server.SA_EMAIL: "writer"}, shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    return Config(root=root, project="proj",
                  tiers=(TierConfig(name="drive", remote="drive", include=("**/logs/**",)),
                         TierConfig(name="hub", remote="hub", include=("**/checkpoints/**",))),
                  sync=SyncConfig(settle=0.0),
                  drive=DriveConfig(folder_id=folder, credentials=str(key), endpoint=drive_server.endpoint),
                  hub=HubConfig(repo_id=REPO, endpoint=hub_server.endpoint, path_prefix=""),
                  resume=ResumeConfig(priority=("local", "drive", "hub")))


def _remote(cfg: Config, name: str):
    r = open_remote(cfg, name)
    assert type(r).__name__ == {"drive": "DriveRemote", "hub": "HubRemote"}[name]
    return r


def _train(cfg: Config, steps: list[int]) -> dict[int, dict]:
    states = {}
    ck = Checkpointer(cfg.checkpoint_dir("v01"), prefix="v01")
    for s in steps:
        states[s] = {"w": torch.full((64, 64), float(s)), "step": s}
        ck.save(s, states[s])
    logs = cfg.log_dir("v01")
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "train.log").write_text("".join(f"step {s} loss {1 / s:.4f}\n" for s in steps))
    return states


def _sync(cfg: Config) -> None:
    """One synchronous pass of the sync engine over the experiment (threads started, flushed and joined)."""
    result = sync.once([cfg.experiment_dir("v01")], config=cfg, timeout=120)
    assert result["ok"], result


def test_weights_only_on_the_hub_logs_only_on_drive(project: Config, hub_server: HubServer):
    _train(project, [100, 200])
    _sync(project)
    with _remote(project, "hub") as hub, _remote(project, "drive") as drive:
        hub_files, drive_files = [f.path for f in hub.list()], [f.path for f in drive.list()]
    assert hub_files == [
        "experiments/v01/checkpoints/latest", "experiments/v01/checkpoints/v01_step_00000100.pt", "experiments/v01/checkpoints/v01_step_00000100.pt.json",
        "experiments/v01/checkpoints/v01_step_00000200.pt", "experiments/v01/checkpoints/v01_step_00000200.pt.json"]
    assert drive_files == ["experiments/v01/logs/train.log"]
    assert hub_server.count("POST", r"/commit/") == 1  # the whole tick in one commit
    assert hub_server.commit_messages(REPO)[0] == "colabkit proj v01: steps 100, 200 (5 files)"


def test_resume_from_the_hub_onto_an_empty_disk(project: Config, hub_server: HubServer):
    states = _train(project, [100, 200])
    _sync(project)
    shutil.rmtree(project.checkpoint_dir("v01"))  # a fresh machine: nothing local

    plan, path = resume_mod.resume(config=project, experiment="v01", progress=False)
    assert (plan.choice.source, plan.choice.step) == ("hub", 200)
    assert path == project.checkpoint_dir("v01") / "v01_step_00000200.pt"
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], states[200]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest", "v01_step_00000200.pt",
                                                              "v01_step_00000200.pt.json"]


def test_corrupt_hub_copy_is_refused_and_resume_falls_back(project: Config, hub_server: HubServer, caplog):
    states = _train(project, [100, 200])
    tiers = (project.tiers[0].__class__(name="drive", remote="drive", include=("**",)), project.tiers[1])
    _sync(project.with_changes(tiers=tiers))  # drive holds the weights too
    with _remote(project, "drive") as drive:
        drive.delete("experiments/v01/checkpoints/v01_step_00000200.pt")
        drive.delete("experiments/v01/checkpoints/v01_step_00000200.pt.json")
    hub_server.corrupt(REPO, "experiments/v01/checkpoints/v01_step_00000200.pt")
    shutil.rmtree(project.checkpoint_dir("v01"))

    caplog.set_level(logging.WARNING)
    plan, path = resume_mod.resume(config=project, experiment="v01", progress=False)
    assert (plan.choice.source, plan.choice.step) == ("drive", 100)
    assert "fell back to drive step 100" in plan.reason
    assert "hub: experiments/v01/checkpoints/v01_step_00000200.pt does not match its recorded hash" in plan.reason
    assert torch.equal(torch.load(path, weights_only=True)["w"], states[100]["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest", "v01_step_00000100.pt",
                                                              "v01_step_00000100.pt.json"]
    assert hub_server.WRITE_TOKEN not in caplog.text
    written = [p for p in project.root.rglob("*") if p.is_file()]
    assert any(p.parent.name == "logs" and p.name == "sync.log" for p in written)  # the engine's own log is scanned
    assert not [p for p in written if hub_server.WRITE_TOKEN.encode() in p.read_bytes()]


def test_hub_unreachable_is_reported_not_silently_skipped(project: Config, hub_server: HubServer):
    _train(project, [100])
    _sync(project)
    shutil.rmtree(project.checkpoint_dir("v01"))
    hub_server.inject(method="GET", path=r"/tree/", status=401, message="Invalid credentials in Authorization header")
    with pytest.raises(ResumeError) as ei:
        resume_mod.locate(config=project, experiment="v01")
    msg = str(ei.value)
    assert msg.startswith("no checkpoint to resume from, and not every source could be asked (local: no checkpoint; "
                          "drive: no checkpoint; hub: RemoteAuthError: hub: listing model repo 'alice/proj-weights' "
                          "failed: the Hugging Face token from the HF_TOKEN environment variable was rejected")
    assert hub_server.WRITE_TOKEN not in msg


def test_storage_quota_stops_the_hub_tier_with_a_clear_status(project: Config, hub_server: HubServer):
    from .hub_server import QUOTA_MESSAGE
    _train(project, [100])
    hub_server.inject(method="POST", path=r"/objects/batch", status=403, message=QUOTA_MESSAGE, times=1000)
    result = sync.once([project.experiment_dir("v01")], config=project, timeout=60)
    hub = result["tiers"]["hub"]
    assert result["ok"] is False and hub["ok"] is False and hub["state"] == "stopped"
    assert "the Hub refused to store more data (HTTP 403)" in hub["last_error"]
    assert "the hub tier stops until space is freed" in hub["last_error"]
    assert hub_server.count("POST", r"/objects/batch") == 1  # stopped, not retried until the deadline
    assert result["tiers"]["drive"]["ok"] is True  # the other tier is not held up
