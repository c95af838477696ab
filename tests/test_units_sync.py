"""A checkpoint folder (a sharded DCP save) is one unit in sync: complete or not at all, manifest last."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml

from colabkit import sync
from colabkit.checkpoints import LATEST, Checkpointer
from colabkit.config import load_config
from colabkit.distributed import FOLDER_MANIFEST
from colabkit.ledger import Ledger
from colabkit.remotes import open_remote
from tests.drive_server import DriveServer, drive_server  # noqa: F401  (fixture)
from tests.hub_server import HubServer, hub_server  # noqa: F401  (fixture)
from tests.sync_child import WrappedRemote
from tests.test_sync import make_project, sha


def sharded(root: Path, step: int, *, n: int = 2000, prefix: str = "v01") -> Path:
    """A colabkit sharded checkpoint folder made through DCP in this process (world size 1)."""
    ck = Checkpointer(root / "checkpoints", prefix=prefix, sharded=True)
    torch.manual_seed(step)
    return ck.save(step, {"model": {"w": torch.randn(n), "b": torch.randn(7)}, "step": step})


def listed(folder: Path) -> list[str]:
    m = json.loads((folder / FOLDER_MANIFEST).read_text())
    return sorted(f["path"] for f in m["files"]) + [FOLDER_MANIFEST]


class Recording(WrappedRemote):
    def __init__(self, inner):
        super().__init__(inner)
        self.order: list[str] = []

    def put(self, local, path, **kw):
        self.order.append(path)
        return super().put(local, path, **kw)


def _local(tmp_path, **tier):
    root = make_project(tmp_path, tiers=[{"name": "backup", "remote": "local", "path": str(tmp_path / "remote"),
                                          "every": 3600, **tier}])
    cfg = load_config(start=root)
    return root, cfg


def test_a_sharded_folder_goes_up_whole_with_its_manifest_last_and_is_one_ledger_entry(tmp_path):
    root, cfg = _local(tmp_path)
    folder = sharded(root, 100)
    rec = Recording(open_remote(cfg, cfg.tier("backup")))
    res = sync.once(config=cfg, remotes={"backup": rec})
    assert res["ok"], res
    rel = "checkpoints/v01_step_00000100"
    names = [p[len(rel) + 1:] for p in rec.order if p.startswith(rel + "/")]
    assert sorted(names) == listed(folder)
    assert names[-1] == FOLDER_MANIFEST            # the folder is complete on the tier only at the end
    for name in listed(folder):
        assert sha(tmp_path / "remote" / rel / name) == sha(folder / name)
    led = Ledger.load(cfg.state_dir, "backup")
    e = led.get(rel + "/")
    assert e is not None and e["files"] == len(listed(folder))
    assert e["size"] == sum((folder / n).stat().st_size for n in listed(folder))
    assert e["sha256"] == sha(folder / FOLDER_MANIFEST)
    summary = led.summary()      # the folder's own entry is not one more file
    assert (summary["files"], summary["folders"]) == (len(listed(folder)) + 1, 1)   # + checkpoints/latest
    # nothing changed: a second pass uploads nothing
    again = Recording(open_remote(cfg, cfg.tier("backup")))
    assert sync.once(config=cfg, remotes={"backup": again})["ok"]
    assert again.order == []


def test_a_half_written_folder_is_never_uploaded_and_counts_as_one_pending_folder(tmp_path):
    root, cfg = _local(tmp_path)
    # another tool's DCP save in progress: shards without the .metadata DCP writes last
    d = root / "checkpoints" / "step_300"
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(os.urandom(5000))
    (d / "__1_0.distcp").write_bytes(os.urandom(5000))
    # and a colabkit save in progress: under its temporary name
    folder = sharded(root, 200)
    tmp_name = root / "checkpoints" / ".colabkit-tmp-v01_step_00000400.abc-1"
    os.rename(folder, tmp_name)
    (root / "checkpoints" / LATEST).unlink()
    group = sync.SyncGroup(cfg, every=3600)
    group._make_observer = lambda: None
    group.start()
    try:
        syncer = group.syncers[0]
        res = group.flush(timeout=1.0)
        assert not res["ok"]
        t = res["tiers"]["backup"]
        assert t["uploaded"] == 0 and t["pending_files"] == 1     # the folder, not its 2 shards
        snap = syncer.snapshot()
        assert snap["pending_bytes"] == 10000
        assert not (tmp_path / "remote" / "checkpoints").exists()
        # DCP finishes: the marker appears; once the sizes are stable the folder goes up, marker last
        (d / ".metadata").write_bytes(b"meta")
        for p in d.iterdir():
            os.utime(p, (1, 1))
        res = group.flush(timeout=5.0)
        assert res["ok"], res
        assert sorted(p.name for p in (tmp_path / "remote" / "checkpoints" / "step_300").iterdir()) == \
            [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert Ledger.load(cfg.state_dir, "backup").get("checkpoints/step_300/")["files"] == 3
        assert not any(".colabkit-tmp" in str(p) for p in (tmp_path / "remote").rglob("*"))
    finally:
        group.stop(flush=False)


def test_a_settled_flush_reports_a_save_that_never_finished_as_skipped(tmp_path):
    root, cfg = _local(tmp_path)
    d = root / "checkpoints" / "step_300"
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(os.urandom(5000))
    group = sync.SyncGroup(cfg, every=3600)
    group._make_observer = lambda: None
    group.start()
    try:
        res = group.flush(timeout=5.0, settled=True)
    finally:
        group.stop(flush=False)
    t = res["tiers"]["backup"]
    assert t["skipped_files"] == {"checkpoints/step_300/":
                                  "incomplete: no manifest or marker (a save that did not finish)"}
    assert t["uploaded"] == 0 and not (tmp_path / "remote" / "checkpoints").exists()


def test_latest_only_picks_the_newest_folder_and_counts_the_older_as_one_skipped(tmp_path):
    root, cfg = _local(tmp_path, latest_only=True)
    sharded(root, 100)
    newest = sharded(root, 200)
    res = sync.once(config=cfg)
    assert res["ok"], res
    t = res["tiers"]["backup"]
    assert t["skipped_files"] == {"checkpoints/v01_step_00000100/": "latest_only: step 200 is newer"}
    assert sorted(p.name for p in (tmp_path / "remote" / "checkpoints").iterdir()) == [LATEST, newest.name]
    assert t["uploaded"] == len(listed(newest)) + 1


def test_a_shard_that_does_not_match_its_manifest_size_keeps_the_folder_off_the_tier(tmp_path):
    root, cfg = _local(tmp_path)
    folder = sharded(root, 100)
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    with open(shard, "ab") as f:
        f.write(b"x")
    res = sync.once(config=cfg)
    t = res["tiers"]["backup"]
    assert t["skipped_files"] == {"checkpoints/v01_step_00000100/":
                                  f"incomplete: {shard.name} is missing or not the size its manifest records"}
    assert not (tmp_path / "remote" / "checkpoints" / folder.name).exists()


def test_hub_tier_gets_a_whole_folder_in_one_commit(hub_server: HubServer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    root = tmp_path / "proj"
    root.mkdir()
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "hub": {"repo_id": "alice/weights", "endpoint": hub_server.endpoint},
        "tiers": [{"name": "hub", "remote": "hub", "every": 3600}],   # the default globs: checkpoints only
        "sync": {"settle": 0.1}}))
    folder = sharded(root, 100)
    cfg = load_config(start=root)
    res = sync.once(config=cfg)
    assert res["ok"], res
    repo = hub_server.repos[("model", "alice/weights")]
    messages = [m for _, m, _ in repo.commits.values()]
    n = len(listed(folder))
    assert messages == ["initial commit", f"colabkit proj: step 100 ({n} files)"]   # the whole folder, one commit
    tree = repo.commits[repo.branches["main"]][2]
    rel = "checkpoints/v01_step_00000100/"
    assert sorted(p[len(rel):] for p in tree if p.startswith(rel)) == sorted(listed(folder))
    assert Ledger.load(cfg.state_dir, "hub").get(rel)["files"] == len(listed(folder))


def test_drive_tier_holds_the_folder_with_every_file_verified(drive_server, tmp_path):
    folder_id = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"},
                                           shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    root = tmp_path / "proj"
    root.mkdir()
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "drive": {"folder_id": folder_id, "credentials": str(key), "endpoint": drive_server.endpoint},
        "tiers": [{"name": "drive", "remote": "drive", "every": 3600, "include": ["**"], "exclude": []}],
        "sync": {"settle": 0.1}}))
    folder = sharded(root, 100)
    cfg = load_config(start=root)
    res = sync.once(config=cfg)
    assert res["ok"], res
    remote = open_remote(cfg, cfg.tier("drive"))
    try:
        got = {f.path: f for f in remote.list("checkpoints/v01_step_00000100")}
    finally:
        remote.close()
    for name in listed(folder):
        assert got[f"checkpoints/v01_step_00000100/{name}"].sha256 == sha(folder / name)
    assert Ledger.load(cfg.state_dir, "drive").get("checkpoints/v01_step_00000100/")["files"] == len(listed(folder))


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def test_a_corrupted_shard_on_disk_keeps_its_folder_off_the_tier_and_says_why(tmp_path, caplog):
    root, cfg = _local(tmp_path)
    folder = sharded(root, 100)
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    _flip(shard)                                     # same size: only the sha256 tells
    with caplog.at_level("WARNING", logger="colabkit.sync"):
        res = sync.once(config=cfg, timeout=30)
    t = res["tiers"]["backup"]
    why = f"corrupted: {shard.name} does not match its manifest's sha256"
    assert res["ok"] and t["skipped_files"] == {"checkpoints/v01_step_00000100/": why}
    assert f"backup: checkpoint folder checkpoints/v01_step_00000100/ not uploaded: {why}" in caplog.text
    assert not (tmp_path / "remote" / "checkpoints" / folder.name / FOLDER_MANIFEST).exists()
    assert not (tmp_path / "remote" / "checkpoints" / folder.name / shard.name).exists()
    assert Ledger.load(cfg.state_dir, "backup").get("checkpoints/v01_step_00000100/") is None


def test_hub_tier_refuses_a_folder_with_a_corrupted_shard(hub_server: HubServer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    root = tmp_path / "proj"
    root.mkdir()
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "hub": {"repo_id": "alice/weights", "endpoint": hub_server.endpoint},
        "tiers": [{"name": "hub", "remote": "hub", "every": 3600}], "sync": {"settle": 0.1}}))
    good = sharded(root, 100)
    bad = sharded(root, 200)
    shard = next(p for p in bad.iterdir() if p.suffix == ".distcp")
    _flip(shard)
    cfg = load_config(start=root)
    res = sync.once(config=cfg, timeout=30)
    assert res["tiers"]["hub"]["skipped_files"] == {
        "checkpoints/v01_step_00000200/": f"corrupted: {shard.name} does not match its manifest's sha256"}
    tree = hub_server.repos[("model", "alice/weights")].commits[
        hub_server.repos[("model", "alice/weights")].branches["main"]][2]
    assert not any(p.startswith("checkpoints/v01_step_00000200/") for p in tree)
    assert sorted(p[len("checkpoints/v01_step_00000100/"):] for p in tree
                  if p.startswith("checkpoints/v01_step_00000100/")) == sorted(listed(good))


def test_a_flush_that_refuses_the_newest_folder_uploads_the_newest_good_one_in_the_same_flush(tmp_path):
    """latest_only picked the newest folder and dropped the older ones for it; when that newest folder was then
    refused as corrupt during the upload, the flush ended with nothing due and the good older checkpoint stayed
    off the tier ('latest_only: step 200 is newer') until the next tick, hours later. Seen under load, when the
    flush was a syncer's first pass; here made certain by flushing before any regular tick."""
    root = tmp_path / "proj"
    root.mkdir()
    remote_dir = tmp_path / "tier"
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "tiers": [{"name": "t", "remote": "local", "path": str(remote_dir), "every": 3600, "latest_only": True}],
        "sync": {"settle": 0.1}}))
    good = sharded(root, 100)
    bad = sharded(root, 200)
    shard = next(p for p in bad.iterdir() if p.suffix == ".distcp")
    _flip(shard)
    cfg = load_config(start=root)
    group = sync.SyncGroup(cfg, None, every=None)   # no thread started: the flush is the syncer's first pass
    res = group.syncers[0]._flush(time.monotonic() + 30, settled=True)
    assert res["skipped_files"] == {
        "checkpoints/v01_step_00000200/": f"corrupted: {shard.name} does not match its manifest's sha256"}
    assert sorted(p.name for p in (remote_dir / "checkpoints" / good.name).iterdir()) == listed(good)
    held_bad = remote_dir / "checkpoints" / bad.name
    assert not (held_bad / FOLDER_MANIFEST).exists() and not (held_bad / shard.name).exists(), \
        "the corrupted shard was left on the tier"
