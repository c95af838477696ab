"""Resume of a checkpoint folder (a sharded DCP save) from every tier: listed as one unit, each file checked
against the folder's manifest, fetched whole under a temporary name, its path handed on; a corrupted shard on
a tier is refused and resume falls back, saying so."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from colabkit import sync
from colabkit.checkpoints import LATEST, Checkpointer
from colabkit.config import load_config
from colabkit.distributed import FOLDER_MANIFEST
from colabkit.resume import fetch, locate, resume
from tests.drive_server import DriveServer, drive_server  # noqa: F401  (fixture)
from tests.hub_server import HubServer, hub_server  # noqa: F401  (fixture)


def _project(tmp_path: Path, tier: dict, extra: dict | None = None):
    root = tmp_path / "proj"
    (root / "experiments" / "v01" / "checkpoints").mkdir(parents=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({"tiers": [tier], "sync": {"settle": 0.1},
                                                        "resume": {"priority": ["local", tier["name"]]},
                                                        **(extra or {})}))
    return load_config(start=root)


def _save(cfg, step: int) -> Path:
    ck = Checkpointer(cfg.checkpoint_dir("v01"), prefix="v01", sharded=True)
    return ck.save(step, {"model": {"w": torch.full((3000,), float(step)), "b": torch.arange(5.0) + step},
                          "step": step})


def _resume_on_an_empty_disk(cfg, tier: str, step: int) -> Path:
    shutil.rmtree(cfg.checkpoint_dir("v01"))               # a new machine: nothing local
    plan, path = resume(config=cfg, experiment="v01", progress=False)
    assert (plan.choice.source, plan.choice.step, plan.choice.folder) == (tier, step, True)
    assert path == cfg.checkpoint_dir("v01") / f"v01_step_{step:08d}"
    assert sorted(p.name for p in path.parent.iterdir()) == [LATEST, path.name]   # no temporary left behind
    state = {"model": {"w": torch.zeros(3000), "b": torch.zeros(5)}, "step": 0}
    Checkpointer(path.parent, prefix="v01").load(path, state=state)   # what train.py does with --resume-from
    assert torch.equal(state["model"]["w"], torch.full((3000,), float(step)))
    assert state["step"] == step
    return path


def test_a_folder_synced_to_a_local_tier_is_resumed_on_an_empty_disk(tmp_path):
    cfg = _project(tmp_path, {"name": "backup", "remote": "local", "path": str(tmp_path / "remote"), "every": 3600})
    _save(cfg, 100)
    _save(cfg, 200)
    assert sync.once(config=cfg)["ok"]
    _resume_on_an_empty_disk(cfg, "backup", 200)


def test_a_corrupted_shard_on_a_tier_is_refused_and_resume_falls_back_saying_so(tmp_path, caplog):
    cfg = _project(tmp_path, {"name": "backup", "remote": "local", "path": str(tmp_path / "remote"), "every": 3600})
    _save(cfg, 100)
    newest = _save(cfg, 200)
    assert sync.once(config=cfg)["ok"]
    shard = next(p.name for p in newest.iterdir() if p.suffix == ".distcp")
    on_tier = tmp_path / "remote" / "experiments" / "v01" / "checkpoints" / newest.name / shard
    data = bytearray(on_tier.read_bytes())
    data[len(data) // 2] ^= 0xFF                             # same size, one bit flipped
    on_tier.write_bytes(bytes(data))
    shutil.rmtree(cfg.checkpoint_dir("v01"))
    with caplog.at_level(logging.WARNING, logger="colabkit.resume"):
        plan = locate(config=cfg, experiment="v01")
    src = plan.source("backup")
    assert [r["step"] for r in src.rejected] == [200]
    assert src.rejected[0]["reason"].startswith(f"{shard} has sha256 ")
    assert src.rejected[0]["reason"].endswith("(corrupted)")
    assert f"backup: experiments/v01/checkpoints/{newest.name} is not usable: {shard} has sha256" in caplog.text
    assert plan.choice.step == 100
    assert plan.lines()[-2].startswith("  backup  step 100        v01_step_00000100/  [1 rejected: "
                                       f"v01_step_00000200: {shard} has sha256 ")
    path = fetch(plan, progress=False)
    assert path.name == "v01_step_00000100"


def test_a_shard_corrupted_after_listing_is_discarded_at_fetch_and_the_next_is_used(tmp_path, caplog):
    cfg = _project(tmp_path, {"name": "backup", "remote": "local", "path": str(tmp_path / "remote"), "every": 3600})
    _save(cfg, 100)
    newest = _save(cfg, 200)
    assert sync.once(config=cfg)["ok"]
    shard = next(p.name for p in newest.iterdir() if p.suffix == ".distcp")
    shutil.rmtree(cfg.checkpoint_dir("v01"))
    plan = locate(config=cfg, experiment="v01")
    assert plan.choice.step == 200
    on_tier = tmp_path / "remote" / "experiments" / "v01" / "checkpoints" / newest.name / shard
    data = bytearray(on_tier.read_bytes())
    data[10] ^= 0xFF
    on_tier.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="colabkit.resume"):
        path = fetch(plan, progress=False)
    assert path.name == "v01_step_00000100"
    assert "fell back to backup step 100" in plan.reason and "does not match its manifest" in plan.reason
    assert "cannot resume from backup step 200" in caplog.text
    # the partial fetch of step 200 never sat under its final name, and nothing of it is left
    assert sorted(p.name for p in path.parent.iterdir()) == [LATEST, path.name]


def test_a_folder_on_the_hub_is_resumed_on_an_empty_disk(tmp_path, hub_server: HubServer, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    cfg = _project(tmp_path, {"name": "hub", "remote": "hub", "every": 3600},
                   {"hub": {"repo_id": "alice/weights", "endpoint": hub_server.endpoint}})
    _save(cfg, 300)
    assert sync.once(config=cfg)["ok"]
    _resume_on_an_empty_disk(cfg, "hub", 300)


def test_a_folder_on_drive_is_resumed_on_an_empty_disk(tmp_path, drive_server):
    folder_id = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"},
                                           shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    cfg = _project(tmp_path, {"name": "drive", "remote": "drive", "every": 3600, "include": ["**"], "exclude": []},
                   {"drive": {"folder_id": folder_id, "credentials": str(key), "endpoint": drive_server.endpoint}})
    _save(cfg, 400)
    assert sync.once(config=cfg)["ok"]
    _resume_on_an_empty_disk(cfg, "drive", 400)


def test_train_takes_a_checkpoint_folder_for_resume_and_restarts_from_the_newest_folder(tmp_path):
    """%train --resume DIR names a folder; a restart of the group resumes from the newest verified folder."""
    from colabkit import runner
    cfg = _project(tmp_path, {"name": "backup", "remote": "local", "path": str(tmp_path / "remote"), "every": 3600})
    older = _save(cfg, 100)
    newest = _save(cfg, 200)
    assert runner._resume_source(cfg, "v01", str(older)) == str(older.resolve())
    sup = runner.Job.__new__(runner.Job)     # only its checkpoint folder is needed here
    sup.checkpoint_dir, sup.experiment = cfg.checkpoint_dir("v01"), "v01"
    assert sup._newest_checkpoint() == str(newest)
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert sup._newest_checkpoint() == str(older)          # the corrupted newest is refused


# -- folders other tools wrote (no manifest): candidates on every tier, verified by loading once fetched ----------
def _dcp_folder(folder: Path, step: int) -> None:
    import warnings
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.full((3000,), float(step))}, "step": step}, checkpoint_id=str(folder),
                 no_dist=True)


def _safetensors_folder(folder: Path, step: int) -> None:
    """An HF Trainer checkpoint: two shards and their index (the safetensors format written by hand)."""
    import json
    import struct
    folder.mkdir(parents=True)
    for i, (name, t) in enumerate((("a.weight", torch.full((300,), float(step))), ("b.bias", torch.arange(5.0)))):
        raw = t.numpy().tobytes()
        head = json.dumps({name: {"dtype": "F32", "shape": list(t.shape), "data_offsets": [0, len(raw)]}}).encode()
        (folder / f"model-0000{i + 1}-of-00002.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + raw)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}}))


def _megatron_folder(ck: Path, step: int) -> None:
    (ck / f"iter_{step:07d}" / "mp_rank_00").mkdir(parents=True)
    torch.save({"iteration": step, "model": {"w": torch.full((300,), float(step))}},
               ck / f"iter_{step:07d}" / "mp_rank_00" / "model_optim_rng.pt")
    (ck / "latest_checkpointed_iteration.txt").write_text(str(step))


def test_folders_other_tools_wrote_on_a_local_tier_are_resumed_and_a_bad_one_falls_back(tmp_path, caplog):
    cfg = _project(tmp_path, {"name": "backup", "remote": "local", "path": str(tmp_path / "remote"), "every": 3600})
    ck = cfg.checkpoint_dir("v01")
    _dcp_folder(ck / "checkpoint-100", 100)
    _safetensors_folder(ck / "checkpoint-200", 200)
    _megatron_folder(ck, 300)
    assert sync.once(config=cfg)["ok"]
    shutil.rmtree(ck)                                          # a new machine: nothing local
    plan = locate(config=cfg, experiment="v01")
    src = plan.source("backup")
    assert [(c.step, c.name, c.kind, c.verified) for c in src.candidates] == [
        (300, "iter_0000300", "megatron", False), (200, "checkpoint-200", "safetensors", False),
        (100, "checkpoint-100", "dcp", False)]
    assert plan.lines()[-2] == "  backup  step 300        iter_0000300/ (no manifest: verified after download)"
    path = fetch(plan, progress=False)
    assert path == ck / "iter_0000300"
    # the tracker comes with it: a checkpoint there for colabkit, and for Megatron's own --load
    assert sorted(p.name for p in ck.iterdir()) == sorted([LATEST, "iter_0000300", "latest_checkpointed_iteration.txt"])
    state = Checkpointer(ck).load(path, weights_only=False)
    assert state["iteration"] == 300 and torch.equal(state["model"]["w"], torch.full((300,), 300.0))

    # a truncated file on the tier: the fetched copy does not load, is discarded, and resume falls back
    pt = tmp_path / "remote/experiments/v01/checkpoints/iter_0000300/mp_rank_00/model_optim_rng.pt"
    pt.write_bytes(pt.read_bytes()[:-100])
    shutil.rmtree(ck)
    with caplog.at_level(logging.WARNING, logger="colabkit.resume"):
        plan, path = resume(config=cfg, experiment="v01", progress=False)
    assert path == ck / "checkpoint-200" and plan.choice.kind == "safetensors"
    assert ("fell back to backup step 200 (backup step 300: backup: experiments/v01/checkpoints/iter_0000300 does "
            "not load once fetched (") in plan.reason
    assert "cannot resume from backup step 300" in caplog.text
    assert sorted(p.name for p in ck.iterdir()) == [  # nothing of step 300 left
        "checkpoint-200", LATEST]
    state = Checkpointer(ck).load(path)
    assert torch.equal(state["a.weight"], torch.full((300,), 200.0))


def test_a_dcp_folder_another_tool_wrote_is_resumed_from_the_hub(tmp_path, hub_server: HubServer, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    cfg = _project(tmp_path, {"name": "hub", "remote": "hub", "every": 3600},
                   {"hub": {"repo_id": "alice/weights", "endpoint": hub_server.endpoint}})
    _dcp_folder(cfg.checkpoint_dir("v01") / "checkpoint-300", 300)
    assert sync.once(config=cfg)["ok"]
    shutil.rmtree(cfg.checkpoint_dir("v01"))
    plan, path = resume(config=cfg, experiment="v01", progress=False)
    assert (plan.choice.source, plan.choice.kind, path.name) == ("hub", "dcp", "checkpoint-300")
    state = {"model": {"w": torch.zeros(3000)}, "step": 0}
    Checkpointer(path.parent).load(path, state=state)
    assert torch.equal(state["model"]["w"], torch.full((3000,), 300.0)) and state["step"] == 300


def test_an_hf_folder_on_drive_is_resumed_on_an_empty_disk(tmp_path, drive_server):
    folder_id = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"},
                                           shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    cfg = _project(tmp_path, {"name": "drive", "remote": "drive", "every": 3600, "include": ["**"], "exclude": []},
                   {"drive": {"folder_id": folder_id, "credentials": str(key), "endpoint": drive_server.endpoint}})
    _safetensors_folder(cfg.checkpoint_dir("v01") / "checkpoint-400", 400)
    assert sync.once(config=cfg)["ok"]
    shutil.rmtree(cfg.checkpoint_dir("v01"))
    plan, path = resume(config=cfg, experiment="v01", progress=False)
    assert (plan.choice.source, plan.choice.kind, path.name) == ("drive", "safetensors", "checkpoint-400")
    assert sorted(p.name for p in path.iterdir()) == ["model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert torch.equal(Checkpointer(path.parent).load(path)["a.weight"], torch.full((300,), 400.0))


def test_a_tiers_iter_folder_beyond_its_tracker_or_without_one_is_no_candidate():
    from colabkit.remotes.base import RemoteFile
    from colabkit.resume import _remote_folders
    ck = "experiments/v01/checkpoints"
    files = [RemoteFile(f"{ck}/iter_{it:07d}/mp_rank_00/model_optim_rng.pt", 10) for it in (100, 200)]
    files += [RemoteFile(f"{ck}/checkpoint-5/trainer_state.json", 2)]   # HF writes the weights first: partial
    assert sorted(_remote_folders(files, ck, tracked=100)) == [f"{ck}/iter_0000100"]   # 200: a save unfinished
    assert sorted(_remote_folders(files, ck, tracked=None)) == []                       # no tracker on the tier
    assert [v[2] for v in _remote_folders(files, ck, tracked=200).values()] == ["megatron", "megatron"]
