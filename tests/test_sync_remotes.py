"""The sync engine against the real Drive and Hub clients talking to the local protocol servers."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from colabkit import sync
from colabkit.config import load_config
from colabkit.fsutil import hash_file
from colabkit.ledger import Ledger
from tests.drive_server import DriveServer, drive_server  # noqa: F401  (fixture)
from tests.hub_server import HubServer, hub_server  # noqa: F401  (fixture)
from tests.test_sync import ckpt, wait_for

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


def big_checkpoint(root: Path, size: int) -> Path:
    p = root / "checkpoints" / "v01_step_00000001.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MiB)
    h = hashlib.sha256()
    with open(p, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
            h.update(block)
    (p.parent / (p.name + ".json")).write_text(json.dumps(
        {"format": 1, "step": 1, "size": size, "sha256": h.hexdigest(), "file": p.name}))
    return p


def test_kill_9_mid_drive_upload_resumes_the_session_from_the_ledger(drive_server, tmp_path):
    """The Drive session URI lives in the ledger: a restarted `colabkit sync once` resumes, not restarts."""
    folder = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    root = tmp_path / "proj"
    src = big_checkpoint(root, 72 * MiB)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "drive": {"folder_id": folder, "credentials": str(key), "endpoint": drive_server.endpoint,
                  "chunk_size": "8MiB"},
        "tiers": [{"name": "drive", "remote": "drive", "every": 3600, "include": ["*.pt", "*.pt.json"],
                   "exclude": [], "max_file_size": "1GB"}],
        "sync": {"settle": 0.1}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "colabkit", "sync", "once", "--config", str(root / "colabkit.yaml")]
    drive_server.pause_at = 40 * MiB
    child = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert drive_server.paused.wait(60), "the upload never got going"
        led = Ledger.load(root / ".colabkit", "drive")
        state = led.upload_state("checkpoints/v01_step_00000001.pt").load()
        assert state and state["offset"] >= 32 * MiB and "upload_id=" in state["uri"]
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        child.stderr.close()
        drive_server.gate.set()
    ranges_before = len(drive_server.content_ranges)
    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "sync once: everything due is uploaded" in again.stdout
    resumed = [cr for cr in drive_server.content_ranges[ranges_before:] if not cr.startswith("bytes */")]
    assert int(resumed[0].split()[1].split("-")[0]) >= 32 * MiB, "the restart began again from byte 0"
    copies = [f for f in drive_server.files.values() if f.name == src.name]
    assert len(copies) == 1 and copies[0].md5 == hash_file(src).md5
    led = Ledger.load(root / ".colabkit", "drive")
    assert led.inflight == {}
    entry = led.verified_copy("checkpoints/v01_step_00000001.pt", hash_file(src).sha256)
    assert entry and entry["remote_id"] == copies[0].id


def test_drive_upload_killed_before_its_metadata_update_is_finished_on_restart(drive_server, tmp_path):
    """issue 16 §5: killed between the last chunk and the metadata update, the file stayed on Drive without the
    recorded sha256; the restart verified it by md5 and never added it. Now the restart adds it (no new upload)."""
    folder = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    root = tmp_path / "proj"
    src = big_checkpoint(root, 2 * MiB)   # with a manifest: its sha256 is known, Drive's md5 comes with the upload
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "drive": {"folder_id": folder, "credentials": str(key), "endpoint": drive_server.endpoint,
                  "chunk_size": "256KiB"},
        "tiers": [{"name": "drive", "remote": "drive", "every": 3600, "include": ["*.pt", "*.pt.json"],
                   "exclude": [], "max_file_size": "1GB"}],
        "sync": {"settle": 0.1}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "colabkit", "sync", "once", "--config", str(root / "colabkit.yaml")]
    drive_server.hold_metadata = True
    child = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert drive_server.held.wait(60), "the upload never reached its metadata update"
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        child.stderr.close()
        drive_server.gate.set()
    digest = hash_file(src)
    (left,) = [f for f in drive_server.files.values() if f.name == src.name]
    assert left.md5 == digest.md5 and "colabkitSha256" not in left.app_properties   # what the kill left
    uploads_before = len(drive_server.content_ranges)
    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(drive_server.content_ranges) == uploads_before   # nothing sent twice
    (done,) = [f for f in drive_server.files.values() if f.name == src.name]
    assert done.id == left.id and done.app_properties == {"colabkitSha256": digest.sha256,
                                                          "colabkitMd5": digest.md5}
    led = Ledger.load(root / ".colabkit", "drive")
    assert led.inflight == {}
    assert led.verified_copy("checkpoints/v01_step_00000001.pt", digest.sha256)
    assert "was uploaded before an interruption; verified and recorded" in \
        (root / ".colabkit" / "logs" / "sync.log").read_text()


def test_hub_tier_gets_a_ticks_files_in_one_commit(hub_server: HubServer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    root = tmp_path / "proj"
    (root / "checkpoints").mkdir(parents=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "hub": {"repo_id": "alice/weights", "endpoint": hub_server.endpoint},
        "tiers": [{"name": "hub", "remote": "hub", "every": 3600, "latest_only": False}],
        "sync": {"settle": 0.1}}))
    files = [ckpt(root, s, size=3000 + s) for s in (1, 2, 3)]
    cfg = load_config(start=root)
    res = sync.once(config=cfg)
    assert res["ok"], res
    repo = hub_server.repos[("model", "alice/weights")]
    messages = [m for _, m, _ in repo.commits.values()]
    assert messages == ["initial commit", "colabkit proj: steps 1, 2, 3 (6 files)"]  # 6 files, one commit
    tree = repo.commits[hub_server.repos[("model", "alice/weights")].branches["main"]][2]
    for f in files:
        assert any(k.endswith(f"checkpoints/{f.name}") for k in tree)
        assert any(k.endswith(f"checkpoints/{f.name}.json") for k in tree)
    led = Ledger.load(cfg.state_dir, "hub")
    for f in files:
        assert led.verified_copy(cfg.remote_path(f), hashlib.sha256(f.read_bytes()).hexdigest())
    n = len(repo.commits)
    assert sync.once(config=cfg)["ok"]
    assert len(repo.commits) == n  # nothing new: no commit at all


def test_what_a_hub_tiers_keep_deletes_no_longer_counts_as_held_and_is_not_sent_again(hub_server: HubServer,
                                                                                     tmp_path, monkeypatch):
    """A Hub tier with keep: 2 deletes older checkpoints in its upload commits. The ledger used to go on saying the
    Hub held them, so the sync tick's pruning deleted the local file too: the checkpoint was gone everywhere."""
    from colabkit.retention import assess
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    root = tmp_path / "proj"
    (root / "checkpoints").mkdir(parents=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "hub": {"repo_id": "alice/weights", "endpoint": hub_server.endpoint},
        "tiers": [{"name": "hub", "remote": "hub", "every": 3600, "latest_only": False, "keep": 2}],
        "retention": {"keep_local": 2, "require_remote": ["hub"]},
        "sync": {"settle": 0.1}}))
    cfg = load_config(start=root)
    one, two = ckpt(root, 1), ckpt(root, 2)
    assert sync.once(config=cfg)["ok"]
    three = ckpt(root, 3)
    assert sync.once(config=cfg)["ok"]   # the commit adding step 3 deletes step 1 on the Hub (keep 2)
    repo = hub_server.repos[("model", "alice/weights")]
    tree = repo.commits[repo.branches["main"]][2]
    assert not any(k.endswith(one.name) for k in tree) and any(k.endswith(three.name) for k in tree)
    assert one.exists(), "step 1 was deleted locally on the strength of a copy the Hub had just deleted"
    led = Ledger.load(cfg.state_dir, "hub")
    assert led.verified_copy(cfg.remote_path(one), hashlib.sha256(one.read_bytes()).hexdigest()) is None
    assert led.verified_copy(cfg.remote_path(three), hashlib.sha256(three.read_bytes()).hexdigest())
    held = {c.step: c.held_by for c in assess(root / "checkpoints", config=cfg)}
    assert held == {1: (), 2: ("hub",), 3: ("hub",)}
    n = len(repo.commits)
    assert sync.once(config=cfg)["ok"]
    assert len(repo.commits) == n, "step 1 was sent to the Hub again, to be deleted again"
    assert one.exists() and two.exists() and three.exists()


def test_drive_token_endpoint_outage_does_not_stop_the_tier(drive_server, tmp_path):
    """Three failed refreshes in a row (503 at the token endpoint) used to stop the Drive tier for the rest
    of the run with "the credentials were rejected". It is transient: the tier backs off and uploads."""
    from colabkit.remotes import open_remote
    folder = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "keys" / "sa.json")
    root = tmp_path / "proj"
    (root / "logs").mkdir(parents=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "drive": {"folder_id": folder, "credentials": str(key), "endpoint": drive_server.endpoint},
        "tiers": [{"name": "drive", "remote": "drive", "every": 3600, "include": ["*.txt"], "exclude": []}],
        "sync": {"settle": 0, "retry_initial": 0.01, "retry_max": 0.05}}))
    (root / "logs" / "notes.txt").write_text("hello\n")
    cfg = load_config(start=root)
    remote = open_remote(cfg, "drive")
    remote.retry_initial, remote.retry_max, remote.max_attempts = 0.001, 0.01, 2
    drive_server.faults.token(9, 503)      # google-auth tries 3 times per refresh: 3 refreshes fail in a row
    res = sync.once(config=cfg, remotes={"drive": remote}, timeout=120)
    remote.close()
    assert res["ok"], res
    t = res["tiers"]["drive"]
    assert t["state"] != "stopped" and t["uploaded"] == 1, t
    assert drive_server.token_faults == 9
    assert drive_server.find("logs/notes.txt", root=folder) is not None


def _added_per_path(repo) -> dict[str, int]:
    """How many commits added or changed each path (a file uploaded twice shows up twice)."""
    out: dict[str, int] = {}
    for parent, _msg, tree in repo.commits.values():
        before = repo.commits[parent][2] if parent else {}
        for p, e in tree.items():
            if p not in before or before[p].oid != e.oid:
                out[p] = out.get(p, 0) + 1
    return out


def test_hub_tier_under_30_percent_faults_on_every_call_uploads_everything_once(hub_server: HubServer, tmp_path,
                                                                                monkeypatch):
    """A failed first attempt leaves every file in flight; the retry looks them up in one retried paths-info
    call and keeps what got up. 14 attempts over 469 s used to upload 0 of 20 files at 30 % faults."""
    from colabkit.remotes.hub import HubRemote
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    root = tmp_path / "proj"
    (root / "checkpoints").mkdir(parents=True)
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "hub": {"repo_id": "alice/weights", "endpoint": hub_server.endpoint},
        "tiers": [{"name": "hub", "remote": "hub", "every": 3600, "latest_only": False}],
        "sync": {"settle": 0.1, "retry_initial": 0.01, "retry_max": 0.05}}))
    files = [ckpt(root, s, size=20_000 + s) for s in range(1, 11)]       # 20 files with the manifests
    # the sync tick prunes local checkpoints beyond retention.keep_local once the tier holds them
    shas = {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in files for p in (f, f.with_name(f.name + ".json"))}
    hub_server.create_repo("alice/weights")
    cfg = load_config(start=root)
    remote = HubRemote("hub", "alice/weights", endpoint=hub_server.endpoint, max_attempts=3, retry_initial=0.01,
                       retry_max=0.05, project="proj")
    hub_server.inject(method="POST", path=r"/commit/", status=503, times=3)   # the first attempt fails
    hub_server.inject(method="POST", path=r"/paths-info/", drop=True)          # and its retry's lookups too
    hub_server.inject(method="POST", path=r"/paths-info/", status=429, headers={"Retry-After": "0"})
    hub_server.ratio(0.3, seed=3)
    res = sync.once(config=cfg, remotes={"hub": remote}, timeout=300)
    hub_server.ratio(0)
    assert res["ok"], res
    assert res["tiers"]["hub"]["state"] != "stopped"
    assert len(hub_server.injected) >= 10, hub_server.injected
    repo = hub_server.repos[("model", "alice/weights")]
    tree = repo.commits[repo.branches["main"]][2]
    added = _added_per_path(repo)
    led = Ledger.load(cfg.state_dir, "hub")
    for f in files:
        for p in (f, f.with_name(f.name + ".json")):
            rp = cfg.remote_path(p)
            assert rp in tree, f"{rp} was lost"
            assert added[rp] == 1, f"{rp} was committed {added[rp]} times"
            assert led.verified_copy(rp, shas[p]), f"{rp} is not recorded"
    assert led.inflight == {}


def test_classic_lfs_upload_killed_mid_way_restarts_from_byte_0(hub_server: HubServer, tmp_path, monkeypatch):
    """The Hub's classic LFS path (HF_HUB_DISABLE_XET=1) cannot resume a cut upload: after a kill -9 mid-way, the
    restart sends the whole file again (bytes sent / needed = 1 + the part cut). Nothing is lost or duplicated.
    The Xet twin is tests/test_hub_xet.py::test_xet_upload_killed_mid_way_resends_only_the_xorb_in_flight."""
    monkeypatch.setenv("HF_TOKEN", hub_server.WRITE_TOKEN)
    root = tmp_path / "proj"
    src = big_checkpoint(root, 32 * MiB)   # more than socket buffers hold: the kill cuts the body
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "hub": {"repo_id": "alice/weights", "endpoint": hub_server.endpoint},
        "tiers": [{"name": "hub", "remote": "hub", "every": 3600, "latest_only": False}],
        "sync": {"settle": 0.1}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_XET": "1"}
    cmd = [sys.executable, "-m", "colabkit", "sync", "once", "--config", str(root / "colabkit.yaml")]
    hub_server.pause_lfs_at = 2 * MiB
    child = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hub_server.paused.wait(60), "the LFS upload never got half-way"
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
        child.stderr.close()
        hub_server.gate.set()
    wait_for(lambda: hub_server.lfs_uploads, timeout=30, what="the server to end the cut upload")
    ((_, cut, complete),) = hub_server.lfs_uploads
    assert not complete and 2 * MiB <= cut < 32 * MiB
    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    resent = hub_server.lfs_bytes_received - cut
    assert resent == 32 * MiB                                  # from byte 0: the cut part is sent again
    assert [u[1:] for u in hub_server.lfs_uploads[1:]] == [(32 * MiB, True)]
    sha = hash_file(src).sha256
    assert hub_server.lfs_path(sha).read_bytes() == src.read_bytes()
    led = Ledger.load(root / ".colabkit", "hub")
    assert led.inflight == {} and led.verified_copy("checkpoints/v01_step_00000001.pt", sha)
