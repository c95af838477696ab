"""Drive's daily upload cap pauses the tier, it does not kill it: the bytes uploaded per rolling 24 h are counted
in the ledger, the tier stops before drive.daily_upload_cap, says "paused until HH:MM" and resumes by itself;
Drive's own cap answer (403 userRateLimitExceeded "User rate limit exceeded.") pauses it the same way."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from colabkit import sync
from colabkit.config import load_config
from colabkit.errors import RemoteUploadCapError
from colabkit.ledger import DAY, FORMAT, Ledger
from colabkit.remotes.drive import DriveRemote
from tests.drive_server import DriveServer, drive_server  # noqa: F401  (fixture)
from tests.test_sync import age, ckpt, wait_for

REPO = Path(__file__).resolve().parents[1]


def project(tmp_path: Path, srv: DriveServer, *, cap: str | int, every="1h") -> Path:
    folder = srv.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = srv.write_service_account(tmp_path / "keys" / "sa.json")
    root = tmp_path / "proj"
    (root / "checkpoints").mkdir(parents=True)
    (root / "logs").mkdir()
    (root / "colabkit.yaml").write_text(yaml.safe_dump({
        "drive": {"folder_id": folder, "credentials": str(key), "endpoint": srv.endpoint, "daily_upload_cap": cap},
        "tiers": [{"name": "drive", "remote": "drive", "every": every, "include": ["**"], "exclude": [],
                   "max_file_size": "1GB"}],
        "sync": {"settle": 0.1, "retry_initial": 0.05, "retry_max": 0.2, "flush_timeout": 60}}))
    return root


def _hhmm(t: float) -> str:
    return time.strftime("%H:%M", time.localtime(t))


def test_the_tier_pauses_before_its_daily_cap_and_says_until_when(drive_server, tmp_path):
    root = project(tmp_path, drive_server, cap="5000B")
    cfg = load_config(start=root)
    # 3000 bytes went up 23 h ago, in an earlier session: they leave the window in an hour
    led = Ledger.load(cfg.state_dir, "drive")
    earlier = time.time() - DAY + 3600
    led.count_upload("logs/old.log", 3000, at=earlier)
    led.save()
    small = root / "logs" / "train.log"
    small.write_text("x" * 1000)
    age(small)
    big = ckpt(root, 100, size=2500)
    res = sync.once(config=cfg, timeout=60)
    t = res["tiers"]["drive"]
    assert not res["ok"] and t["state"] != "timeout"
    assert t["uploaded"] == 1 and t["pending_files"] == 2     # the log went up; the checkpoint and its manifest wait
    assert t["paused_until"] == pytest.approx(earlier + DAY)
    assert t["paused"] == f"paused until {_hhmm(earlier + DAY)}"
    assert t["pause_reason"] == (
        "4.0 KB uploaded to this tier in the last 24 h, and checkpoints/v01_step_00000100.pt (2.5 KB) would pass "
        "drive.daily_upload_cap (5.0 KB; Drive refuses more than about 750 GB a day); uploads go on by themselves "
        "then; weights belong on the Hub: keep checkpoints out of this tier (exclude: ['*.pt', '*.pt.json', ...]) "
        "and let a hub tier take them")
    assert drive_server.find("logs/train.log", root=cfg.drive.folder_id) is not None
    assert drive_server.find(f"checkpoints/{big.name}", root=cfg.drive.folder_id) is None
    # the count is in the ledger (format 2), for every process that syncs this tier
    data = json.loads((cfg.state_dir / "ledger" / "drive.json").read_text())
    assert data["format"] == FORMAT == 2
    assert [u[1:] for u in data["uploads"]] == [[3000, "logs/old.log"], [1000, "logs/train.log"]]
    # the text status says it, and the CLI pass exits 1 at once instead of waiting for the flush timeout
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "colabkit", "sync", "once", "--config", str(root / "colabkit.yaml")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"drive: NOT done (paused) · uploaded 0 · pending 2 · paused until "
                            f"{_hhmm(earlier + DAY)}: 4.0 KB uploaded to this tier in the last 24 h")
    assert "weights belong on the Hub" in first
    # with nothing running, `colabkit sync status` says what the ledger counted against the cap
    r = subprocess.run([sys.executable, "-m", "colabkit", "sync", "status", "--config", str(root / "colabkit.yaml")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("drive: holds ")]
    assert line.startswith("drive: holds 1 files / 1.0 KB · last upload ") and \
        line.endswith(" · uploaded 4.0 KB in the last 24 h")


def test_the_pause_counts_what_went_up_later_in_the_same_tick(drive_server, tmp_path):
    # the checkpoint sorts before the log, so it is measured against the cap first; the log then goes up in the same
    # tick. The reason used to keep the count from before the log (3.0 KB) until another tick came, which a busy
    # machine did not reach before `sync once` returned
    root = project(tmp_path, drive_server, cap="5000B")
    cfg = load_config(start=root)
    led = Ledger.load(cfg.state_dir, "drive")
    led.count_upload("logs/old.log", 3000, at=time.time() - DAY + 3600)
    led.save()
    small = root / "logs" / "train.log"
    small.write_text("x" * 1000)
    age(small)
    ckpt(root, 100, size=2500)
    try:
        g = sync.start(config=cfg)   # one tick at start, the next in an hour
        st = wait_for(lambda: (t := g.status()["tiers"]["drive"])["uploaded"] == 1 and t["state"] == "paused" and t,
                      timeout=30, what="the first tick")
        assert st["pause_reason"].startswith("4.0 KB uploaded to this tier in the last 24 h, and "
                                             "checkpoints/v01_step_00000100.pt (2.5 KB) would pass")
    finally:
        sync.stop(flush=False)


def test_the_tier_resumes_by_itself_once_the_window_moves_on(drive_server, tmp_path):
    root = project(tmp_path, drive_server, cap="5000B", every=0.2)
    cfg = load_config(start=root)
    led = Ledger.load(cfg.state_dir, "drive")
    led.count_upload("logs/old.log", 3000, at=time.time() - DAY + 6)   # leaves the window in ~6 s
    led.save()
    big = ckpt(root, 100, size=2500)
    try:
        g = sync.start(config=cfg)
        st = wait_for(lambda: (t := g.status()["tiers"]["drive"])["state"] == "paused" and t, what="the pause")
        assert st["paused_until"] is not None and st["pending_files"] == 2
        # the dashboard (text, and the widget built from it) shows it
        from colabkit.dashboard import render_text
        (line,) = [x for x in render_text({"sync": sync.status()}) if x.startswith("  drive: ")]
        assert f" · paused until {_hhmm(st['paused_until'])}: " in line and "weights belong on the Hub" in line
        # the upload count moves before the tick ends: wait for the tier to be back at rest too
        st = wait_for(lambda: (t := g.status()["tiers"]["drive"])["uploaded"] == 2 and t["state"] == "idle" and t,
                      timeout=30, what="the upload after the pause")
        assert st["paused_until"] is None and st["pending_files"] == 0
        assert drive_server.find(f"checkpoints/{big.name}", root=cfg.drive.folder_id) is not None
    finally:
        sync.stop(flush=False)


def test_drives_cap_answer_is_an_upload_cap_error_not_retried(drive_server, tmp_path, request):
    """Drive's daily-cap answer is told apart from its per-minute rate limit (same reason, another message)."""
    folder = drive_server.create_folder("colabkit", share_with={DriveServer.SA_EMAIL: "writer"}, shared_drive=True)
    key = drive_server.write_service_account(tmp_path / "sa.json")
    cfg = load_config(data={"drive": {"folder_id": folder, "credentials": str(key), "endpoint": drive_server.endpoint}})
    remote = DriveRemote.from_config(cfg, cfg.tier("drive"))
    src = tmp_path / "a.bin"
    src.write_bytes(b"a" * 1000)
    try:
        drive_server.faults.daily_cap(1)
        with pytest.raises(RemoteUploadCapError) as ei:
            remote.put(src, "a.bin")
        assert str(ei.value) == (
            "drive: upload a.bin failed: Drive's daily upload cap is reached (403 userRateLimitExceeded: User rate "
            "limit exceeded.); about 750 GB per account per day can be uploaded. The tier pauses and tries again "
            "later; nothing local was deleted")
        assert [k for k, *_ in drive_server.faults.injected] == ["status"]   # asked once, not 8 times
        # the per-minute limit carries the same reason and is retried
        drive_server.faults.fail(2, 403, reason="userRateLimitExceeded", path="/upload/")
        remote.retry_initial = 0.01
        assert remote.put(src, "a.bin").size == 1000
    finally:
        remote.close()


def test_a_cap_answer_pauses_the_tier_instead_of_stopping_it(drive_server, tmp_path):
    root = project(tmp_path, drive_server, cap=0, every=0.2)
    cfg = load_config(start=root)
    log_file = root / "logs" / "train.log"
    log_file.write_text("hello\n")
    age(log_file)
    drive_server.faults.daily_cap(1)
    try:
        g = sync.start(config=cfg)
        st = wait_for(lambda: (t := g.status()["tiers"]["drive"])["state"] == "paused" and t, what="the pause")
        assert st["pause_reason"].startswith("Drive answered that this account's daily upload cap is reached (drive: "
                                             "upload logs/train.log failed: Drive's daily upload cap is reached")
        assert st["paused_until"] == pytest.approx(time.time() + 3600, abs=30)
        assert g.syncers[0].fatal is None and st["pending_files"] == 1
        res = sync.flush(timeout=30)   # answered at once: nothing goes up before the pause ends
        assert not res["ok"] and res["tiers"]["drive"]["paused"] == st["paused"]
        # the hour passes (moved here, not waited for): the tier tries again by itself and succeeds
        g.syncers[0]._cap_answer_until = time.time()
        g.syncers[0]._next_due = 0.0
        g.syncers[0]._wake.set()
        wait_for(lambda: g.status()["tiers"]["drive"]["uploaded"] == 1, timeout=30, what="the upload after the pause")
        assert g.status()["tiers"]["drive"]["state"] == "idle"
    finally:
        sync.stop(flush=False)


def test_a_format_1_ledger_is_read_and_rewritten_as_format_2(tmp_path):
    d = tmp_path / "ledger"
    d.mkdir()
    (d / "drive.json").write_text(json.dumps({"format": 1, "tier": "drive", "entries": {
        "a.txt": {"remote_path": "a.txt", "size": 3, "sha256": "x", "uploaded_at": 1.0}}, "inflight": {}}))
    led = Ledger.load(tmp_path, "drive")
    assert led.get("a.txt")["size"] == 3 and led.uploads == [] and led.uploaded_within() == 0
    led.count_upload("b.txt", 10)
    led.save()
    data = json.loads((d / "drive.json").read_text())
    assert data["format"] == 2 and "a.txt" in data["entries"] and data["uploads"][0][1:] == [10, "b.txt"]
    # two processes' counts merge; rows older than a day are dropped
    other = Ledger.load(tmp_path, "drive")
    other.count_upload("c.txt", 20)
    other.count_upload("old.txt", 99, at=time.time() - DAY - 1)
    other.save()
    led.count_upload("d.txt", 30)
    led.save()
    assert sorted(u[2] for u in Ledger.load(tmp_path, "drive").uploads) == ["b.txt", "c.txt", "d.txt"]
    assert Ledger.load(tmp_path, "drive").uploaded_within() == 60
