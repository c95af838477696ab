"""The sync engine with real files, real watchdog observers and local-folder tiers."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from colabkit import sync
from colabkit.config import load_config
from colabkit.errors import ConfigError, RemoteQuotaError, SyncError
from colabkit.ledger import Ledger
from colabkit.remotes import open_remote
from tests.sync_child import FlakyRemote, WrappedRemote


def wait_for(cond, timeout=10.0, what="condition"):
    """Poll `cond` until true (a condition with a timeout, not a bare sleep)."""
    ev = threading.Event()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        ev.wait(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def make_project(tmp_path: Path, *, tiers=None, sync_cfg=None, retention=None) -> Path:
    root = tmp_path / "proj"
    (root / "checkpoints").mkdir(parents=True)
    (root / "logs").mkdir()
    tiers = tiers or [{"name": "backup", "remote": "local", "path": str(tmp_path / "remote_backup"), "every": 0.2}]
    data = {"tiers": tiers, "sync": {"settle": 0.1, "retry_initial": 0.05, "retry_max": 0.3, **(sync_cfg or {})}}
    if retention:
        data["retention"] = retention
    import yaml
    (root / "colabkit.yaml").write_text(yaml.safe_dump(data))
    return root


def ckpt(root: Path, step: int, size: int = 2000, *, manifest: bool = True, prefix: str = "v01") -> Path:
    p = root / "checkpoints" / f"{prefix}_step_{step:08d}.pt"
    data = os.urandom(size)
    p.write_bytes(data)
    if manifest:
        (p.parent / (p.name + ".json")).write_text(json.dumps(
            {"format": 1, "step": step, "size": size, "sha256": hashlib.sha256(data).hexdigest(), "file": p.name}))
    return p


def age(p: Path, seconds: float = 60.0) -> None:
    """Make a file look written `seconds` ago (settled)."""
    t = time.time() - seconds
    os.utime(p, (t, t))


@pytest.fixture
def project(tmp_path):
    root = make_project(tmp_path)
    yield root
    sync.stop(flush=False)


def remote_files(folder: Path) -> dict[str, str]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file() and ".colabkit-digests" not in p.parts:
            out[p.relative_to(folder).as_posix()] = sha(p)
    return out


def test_glob_patterns_basename_and_path():
    pat = sync.Patterns(["*.pt", "experiments/**/logs/*.log"], ["*_tmp.pt"])
    assert pat("experiments/v01/checkpoints/v01_step_00000001.pt")
    assert not pat("experiments/v01/checkpoints/a_tmp.pt")
    assert pat("experiments/v01/logs/train.log")
    assert pat("experiments/a/b/logs/x.log")
    assert not pat("logs/train.log")  # a pattern with '/' is relative to the root
    assert not pat("notes.txt")
    assert sync.Patterns(["**"], [])("any/thing/at/all.bin")


def test_flush_uploads_complete_files_and_never_temporaries(project, tmp_path):
    cfg = load_config(start=project)
    c1 = ckpt(project, 100)
    log_file = project / "logs" / "train.log"
    log_file.write_text("step 1 loss 2.0\n")
    age(log_file)
    (project / "checkpoints" / ".colabkit-tmp-v01_step_00000200.pt.abc").write_bytes(b"half")
    (project / "checkpoints" / "v01_step_00000300.pt.part").write_bytes(b"half")
    # a sharded save in progress: its shards look like any file, inside a folder with a temporary name
    shards = project / "checkpoints" / ".colabkit-tmp-v01_step_00000400.1a2b-1"
    shards.mkdir()
    (shards / "__0_0.distcp").write_bytes(b"shard")
    age(shards / "__0_0.distcp")
    sync.start(config=cfg, every=3600)
    (shards / "__1_0.distcp").write_bytes(b"shard")   # seen by the watchdog observer too
    res = sync.flush(timeout=20)
    assert res["ok"], res
    got = remote_files(tmp_path / "remote_backup")
    assert got == {"checkpoints/v01_step_00000100.pt": sha(c1),
                   "checkpoints/v01_step_00000100.pt.json": sha(c1.with_name(c1.name + ".json")),
                   "logs/train.log": sha(log_file)}
    led = Ledger.load(cfg.state_dir, "backup")
    assert led.verified_copy("checkpoints/v01_step_00000100.pt", sha(c1))["size"] == 2000
    text = (project / ".colabkit" / "logs" / "sync.log").read_text()
    assert text.count("uploaded checkpoints/v01_step_00000100.pt (2000 bytes)") == 1


def test_unsettled_file_waits_until_stable(project, tmp_path):
    """A plain torch.save file without a manifest is uploaded only once its size and mtime stop changing."""
    cfg = load_config(start=project).with_changes(
        sync=load_config(start=project).sync.__class__(settle=2.0, retry_initial=0.05))
    f = project / "checkpoints" / "v68_step_1200.pt"
    f.write_bytes(b"a" * 100)
    g = sync.start(config=cfg, every=0.1)
    dst = tmp_path / "remote_backup" / "checkpoints" / "v68_step_1200.pt"
    wait_for(lambda: g.status()["tiers"]["backup"]["last_tick"], what="a first tick")
    wait_for(lambda: g.status()["tiers"]["backup"]["pending_files"] == 1, what="the file counted as pending")
    assert not dst.exists()
    with open(f, "ab") as fh:  # still being written: its clock restarts
        fh.write(b"b" * 100)
    wait_for(lambda: dst.exists(), timeout=10, what="upload after settling")
    assert dst.read_bytes() == b"a" * 100 + b"b" * 100
    wait_for(lambda: g.status()["tiers"]["backup"]["pending_files"] == 0, what="nothing pending after the upload")


def test_nothing_uploaded_twice_and_grown_log_is_updated(project, tmp_path):
    cfg = load_config(start=project)
    wrapped = WrappedRemote(open_remote(cfg, "backup"))
    c1 = ckpt(project, 1)
    log_file = project / "logs" / "train.log"
    log_file.write_text("line 1\n")
    age(log_file)
    sync.start(config=cfg, remotes={"backup": wrapped}, every=0.1)
    assert sync.flush(timeout=20)["ok"]
    assert sorted(wrapped.puts) == ["checkpoints/v01_step_00000001.pt", "checkpoints/v01_step_00000001.pt.json",
                                    "logs/train.log"]
    # touching a file (same content, new mtime) does not upload it again
    age(c1, 30)
    # the log grows: it is uploaded again as an update
    with open(log_file, "a") as fh:
        fh.write("line 2\n")
    age(log_file, 20)
    assert sync.flush(timeout=20)["ok"]
    assert sorted(wrapped.puts) == ["checkpoints/v01_step_00000001.pt", "checkpoints/v01_step_00000001.pt.json",
                                    "logs/train.log", "logs/train.log"]
    assert (tmp_path / "remote_backup" / "logs" / "train.log").read_text() == "line 1\nline 2\n"
    sync.stop()
    # a restarted process (fresh ledger objects) uploads nothing already verified
    wrapped2 = WrappedRemote(open_remote(cfg, "backup"))
    res = sync.once(config=cfg, remotes={"backup": wrapped2})
    assert res["ok"] and wrapped2.puts == []


def test_watchdog_event_marks_pending_before_the_tier_is_due(project):
    cfg = load_config(start=project)
    g = sync.start(config=cfg, every=3600)
    wait_for(lambda: g.status()["tiers"]["backup"]["last_tick"], what="the first tick")
    assert g.status()["tiers"]["backup"]["pending_files"] == 0
    ckpt(project, 7, size=5000)
    # the manifest's own size arrives with its modified event (created empty, then written)
    st = wait_for(lambda: (s := g.status()["tiers"]["backup"])["pending_files"] == 2 and s["pending_bytes"] > 5000
                  and s, what="watchdog to report the new checkpoint and manifest")
    assert st["next_due"] > time.time() + 3000


def test_polling_observer_is_used_when_forced(tmp_path):
    root = make_project(tmp_path, sync_cfg={"poll": True, "poll_interval": 0.1})
    try:
        g = sync.start(config=load_config(start=root), every=3600)
        assert g.status()["polling"] is True
        wait_for(lambda: g.status()["tiers"]["backup"]["last_tick"], what="first tick")
        ckpt(root, 3)
        wait_for(lambda: g.status()["tiers"]["backup"]["pending_files"] == 2, what="the polling observer's event")
    finally:
        sync.stop(flush=False)


@pytest.mark.parametrize("err", [(28, "inotify watch limit reached"), (24, "inotify instance limit reached")])
def test_spent_inotify_limits_fall_back_to_polling_and_say_how_to_raise_them(tmp_path, monkeypatch, err):
    # watchdog raises these from start() when the machine's inotify limits are spent (VS Code's file watcher on the
    # VM takes thousands); sync used to fail to start at all
    from watchdog.observers import Observer
    started = []

    class Spent(Observer):
        def start(self):
            started.append(self)
            raise OSError(*err)

    monkeypatch.setattr(sync, "_native_observer", lambda: Spent())
    root = make_project(tmp_path, sync_cfg={"poll_interval": 0.1})
    try:
        g = sync.start(config=load_config(start=root), every=3600)
        st = g.status()
        assert st["polling"] is True and started
        assert st["notes"] == [f"the folder watch cannot use inotify ({err[1]}); polling every 0.1s instead. To "
                               "watch again: sudo sysctl fs.inotify.max_user_watches=524288 "
                               "fs.inotify.max_user_instances=512"]
        wait_for(lambda: g.status()["tiers"]["backup"]["last_tick"], what="first tick")
        ckpt(root, 3)
        wait_for(lambda: g.status()["tiers"]["backup"]["pending_files"] == 2, what="the polling observer's event")
    finally:
        sync.stop(flush=False)


def test_other_errors_of_the_folder_watch_are_not_hidden_by_polling(tmp_path, monkeypatch):
    from watchdog.observers import Observer

    class Denied(Observer):
        def start(self):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sync, "_native_observer", lambda: Denied())
    root = make_project(tmp_path)
    with pytest.raises(PermissionError):
        sync.start(config=load_config(start=root), every=3600)
    assert sync._groups() == []


def test_network_path_gets_polling_observer(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    monkeypatch.setenv("COLABKIT_NETWORK_PATHS", str(root))
    try:
        g = sync.start(config=load_config(start=root), every=3600)
        assert g.status()["polling"] is True
    finally:
        sync.stop(flush=False)


def test_latest_only_uploads_only_the_newest_checkpoint(tmp_path):
    root = make_project(tmp_path, tiers=[
        {"name": "weights", "remote": "local", "path": str(tmp_path / "w"), "every": 0.1,
         "include": ["*.pt", "*.pt.json"], "latest_only": True},
        {"name": "logs", "remote": "local", "path": str(tmp_path / "l"), "every": 0.1,
         "include": ["**"], "exclude": ["*.pt", "*.pt.json"], "max_file_size": 100}])
    try:
        cfg = load_config(start=root)
        for s in (1, 2, 3):
            ckpt(root, s)
        small = root / "logs" / "a.log"
        small.write_text("x" * 10)
        big = root / "logs" / "big.log"
        big.write_text("x" * 1000)
        age(small), age(big)
        sync.start(config=cfg)
        assert sync.flush(timeout=20)["ok"]
        assert sorted(remote_files(tmp_path / "w")) == ["checkpoints/v01_step_00000003.pt",
                                                       "checkpoints/v01_step_00000003.pt.json"]
        assert sorted(remote_files(tmp_path / "l")) == ["logs/a.log"]
        st = sync.status()["tiers"]
        assert st["logs"]["skipped"] == 1
        # an older checkpoint appearing later is never uploaded over a newer one
        ckpt(root, 2, size=10)
        ckpt(root, 4)
        assert sync.flush(timeout=20)["ok"]
        assert sorted(remote_files(tmp_path / "w")) == [
            "checkpoints/v01_step_00000003.pt", "checkpoints/v01_step_00000003.pt.json",
            "checkpoints/v01_step_00000004.pt", "checkpoints/v01_step_00000004.pt.json"]
    finally:
        sync.stop(flush=False)


def test_remote_failing_every_third_call_still_gets_everything(project, tmp_path):
    cfg = load_config(start=project)
    flaky = FlakyRemote(open_remote(cfg, "backup"))
    files = [ckpt(project, s, size=1000 + s) for s in range(1, 6)]
    expected = {f"checkpoints/{f.name}": sha(f) for f in files}   # (retention deletes the oldest once up)
    expected.update({f"checkpoints/{f.name}.json": sha(f.with_name(f.name + ".json")) for f in files})
    g = sync.start(config=cfg, remotes={"backup": flaky}, every=0.1)
    seen_error = wait_for(lambda: g.status()["tiers"]["backup"]["last_error"], what="the injected error in status")
    assert "503 Service Unavailable (injected" in seen_error
    assert g.status()["tiers"]["backup"]["errors"] >= 1
    wait_for(lambda: remote_files(tmp_path / "remote_backup") == expected, timeout=30, what="every file")
    # once a tick succeeds the error is cleared from status; the count stays
    wait_for(lambda: g.status()["tiers"]["backup"]["last_error"] is None, what="the error to clear")
    assert g.status()["tiers"]["backup"]["errors"] >= 1
    assert sorted(flaky.puts) == sorted(expected)  # each exactly once despite the failures


class QuotaRemote(WrappedRemote):
    def put(self, local, path, **kw):
        raise RemoteQuotaError(f"{self.name}: storage quota exceeded; free space in Drive", remote=self.name)


def test_quota_error_stops_the_tier_with_a_clear_status(project):
    cfg = load_config(start=project)
    ckpt(project, 1)
    g = sync.start(config=cfg, remotes={"backup": QuotaRemote(open_remote(cfg, "backup"))}, every=0.1)
    st = wait_for(lambda: (s := g.status()["tiers"]["backup"])["state"] == "stopped" and s, what="tier stopped")
    assert st["last_error"] == "RemoteQuotaError: backup: storage quota exceeded; free space in Drive"
    res = sync.flush(timeout=5)
    assert not res["ok"] and res["tiers"]["backup"]["last_error"] == st["last_error"]
    assert "tier stopped: RemoteQuotaError" in (project / ".colabkit" / "logs" / "sync.log").read_text()


def test_start_again_replaces_and_stop_twice_is_fine(project):
    cfg = load_config(start=project)
    g1 = sync.start(config=cfg, every=3600)
    g2 = sync.start(config=cfg, every=3600)
    assert g1 is not g2 and not g1.running and g2.running
    names = [t.name for t in threading.enumerate() if t.name.startswith("colabkit-sync-backup")]
    assert names == ["colabkit-sync-backup"]
    assert len(sync.status()["groups"]) == 1
    r1 = sync.stop()
    assert r1["stopped"] == 1 and r1["ok"]
    r2 = sync.stop()
    assert r2["stopped"] == 0
    assert g2.stop()["ok"]  # the group's own stop is idempotent too
    assert not any(t.name.startswith("colabkit-sync") for t in threading.enumerate())
    assert sync.status()["running"] is False


def test_stopping_a_group_that_never_started_returns_at_once(project):
    cfg = load_config(start=project)
    g = sync.SyncGroup(cfg, every=3600)
    # nothing was started: nothing to flush (a flush would report the tier), no thread to wait for, no error (it
    # raised AttributeError)
    res = g.stop(timeout=30)
    assert res == {"ok": True, "tiers": {}}
    assert not g.running and g.stop()["ok"]
    assert not any(t.name.startswith("colabkit-sync") for t in threading.enumerate())


def test_a_start_that_fails_lets_go_of_its_log_and_leaves_nothing_running(project, monkeypatch):
    # the folder watch cannot be set up (an inotify limit on a machine whose editor took every watch): the error
    # reaches the caller, and sync.log is not left open with nobody to close it
    cfg = load_config(start=project)

    def no_watch(self):
        raise OSError(28, "inotify watch limit reached")

    monkeypatch.setattr(sync.SyncGroup, "_make_observer", no_watch)
    with pytest.raises(OSError, match="inotify watch limit reached"):
        sync.start(config=cfg, every=3600)
    assert str(cfg.state_dir / "logs" / "sync.log") not in sync._log_handlers
    assert sync._groups() == [] and not any(t.name.startswith("colabkit-sync") for t in threading.enumerate())


def test_bad_inputs_have_clear_errors(project, tmp_path):
    cfg = load_config(start=project)
    with pytest.raises(SyncError) as e:
        sync.start(["nope"], config=cfg)
    assert str(e.value) == (f"cannot watch {project / 'nope'}: no such file or folder; create it or pass another path")
    with pytest.raises(ConfigError) as e:
        sync.start(config=cfg, tiers=["hub2"])
    assert str(e.value) == "no tier named 'hub2'; configured tiers: backup"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(ConfigError) as e:
        sync.start([outside], config=cfg)
    assert str(e.value) == (f"{outside} is outside the project root {project}; keep synced folders inside it")
    with pytest.raises(SyncError) as e:
        sync.flush()
    assert str(e.value) == ("sync is not running; start it with '%sync start' (or 'colabkit sync once' for one pass)")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "colabkit.yaml").write_text("tiers: [{name: b, remote: local}]\n")
    with pytest.raises(SyncError) as e:
        sync.start(config=load_config(start=empty))
    assert str(e.value).startswith(f"nothing to watch under {empty}: none of checkpoints, logs, journal.md exists")


def test_default_paths_cover_experiment_folders(tmp_path):
    root = make_project(tmp_path)
    exp = root / "experiments" / "v02"
    (exp / "checkpoints").mkdir(parents=True)
    (root / "journal.md").write_text("# journal\n")
    age(root / "journal.md")
    c = exp / "checkpoints" / "v02_step_00000010.pt"
    c.write_bytes(b"w" * 10)
    age(c)
    res = sync.once(config=load_config(start=root))
    assert res["ok"]
    assert sorted(remote_files(tmp_path / "remote_backup")) == [
        "experiments/v02/checkpoints/v02_step_00000010.pt", "journal.md"]
    assert not any(t.name.startswith("colabkit-sync") for t in threading.enumerate())


def test_local_tier_inside_the_project_is_not_synced_into_itself(tmp_path):
    root = make_project(tmp_path, tiers=[{"name": "backup", "remote": "local", "path": "backup", "every": 0.1}])
    c = ckpt(root, 1)
    res = sync.once([root], config=load_config(start=root))
    assert res["ok"]
    got = remote_files(root / "backup")
    assert "checkpoints/v01_step_00000001.pt" in got and not any(k.startswith("backup/") for k in got)
    assert got["checkpoints/v01_step_00000001.pt"] == sha(c)


class DataFailsRemote(WrappedRemote):
    """Every checkpoint data upload fails (transiently); manifests and logs would succeed."""

    def put(self, local, path, **kw):
        if path.endswith(".pt"):
            from colabkit.errors import TransientRemoteError
            raise TransientRemoteError(f"{self.name}: 500 Internal Server Error (injected)", remote=self.name)
        return super().put(local, path, **kw)


def test_a_manifest_never_goes_up_without_its_checkpoint(project, tmp_path):
    cfg = load_config(start=project)
    ckpt(project, 1)
    res = sync.once(config=cfg, remotes={"backup": DataFailsRemote(open_remote(cfg, "backup"))}, timeout=1.0)
    assert not res["ok"]
    assert res["tiers"]["backup"]["last_error"] == (
        "TransientRemoteError: backup: 500 Internal Server Error (injected)")
    assert remote_files(tmp_path / "remote_backup") == {}


def test_background_threads_never_print(project, capfd):
    cfg = load_config(start=project)
    ckpt(project, 1)
    g = sync.start(config=cfg, remotes={"backup": FlakyRemote(open_remote(cfg, "backup"))}, every=0.1)
    wait_for(lambda: g.status()["tiers"]["backup"]["uploaded"] == 2, what="uploads")
    sync.stop()
    assert capfd.readouterr() == ("", "")
    text = (project / ".colabkit" / "logs" / "sync.log").read_text()
    assert "backup: uploaded checkpoints/v01_step_00000001.pt (2000 bytes)" in text


class RateLimitedOnce(WrappedRemote):
    """The first put is refused with 429 and Retry-After: 0.8 s (as the Hub or Drive would send)."""

    def put(self, local, path, **kw):
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            from colabkit.errors import TransientRemoteError
            raise TransientRemoteError(f"{self.name}: 429 Too Many Requests", remote=self.name, retry_after=0.8)
        return super().put(local, path, **kw)


def test_retry_after_is_honoured(project, tmp_path):
    cfg = load_config(start=project)  # retry_initial 0.05 s: without Retry-After it would retry at once
    c = ckpt(project, 1)
    remote = RateLimitedOnce(open_remote(cfg, "backup"))
    g = sync.start(config=cfg, remotes={"backup": remote}, every=0.05)
    st = wait_for(lambda: (s := g.status()["tiers"]["backup"])["retry_at"] and s, what="the back-off")
    assert st["state"] == "retrying" and st["last_error"] == "TransientRemoteError: backup: 429 Too Many Requests"
    assert st["retry_at"] - st["last_error_at"] >= 0.79
    dst = tmp_path / "remote_backup" / "checkpoints" / c.name
    wait_for(lambda: dst.exists() and dst.with_name(c.name + ".json").exists(), what="the upload after the back-off")
    assert os.path.getmtime(dst) >= st["last_error_at"] + 0.79
    assert remote.calls == 3  # the refused call, then the checkpoint and its manifest


def test_growing_log_goes_up_every_tick_and_a_settled_stop_takes_the_rest_at_once(tmp_path):
    """A log written every moment never 'settles', yet each due tick uploads it as it is (a preempted run's
    log reaches the tier); a stop that knows the writers ended (the end of %train) does not wait out the
    settle time of a file written just before it."""
    root = make_project(tmp_path, sync_cfg={"settle": 600})
    cfg = load_config(start=root)
    log_file = root / "logs" / "run.attempt1.log"
    log_file.write_text("step 1 loss 1.0\n")
    g = sync.start(config=cfg, every=0.05)
    dst = tmp_path / "remote_backup" / "logs" / "run.attempt1.log"
    wait_for(lambda: dst.exists(), what="the growing log on a regular tick")
    with log_file.open("a") as f:
        f.write("step 2 loss 0.5\n")
    wait_for(lambda: dst.exists() and dst.read_text().endswith("step 2 loss 0.5\n"), what="the log updated")
    (root / "logs" / "run.json").write_text('{"state": "finished"}\n')  # written just now: settles in 600 s
    stopped = threading.Event()
    result: dict = {}
    t = threading.Thread(target=lambda: (result.update(g.stop(timeout=300, settled=True)), stopped.set()))
    t.start()
    try:
        wait_for(stopped.is_set, timeout=30, what="stop(settled=True) without waiting out the settle time")
    finally:
        t.join(330)
    assert result["ok"] is True
    assert (tmp_path / "remote_backup" / "logs" / "run.json").read_text() == '{"state": "finished"}\n'


def test_an_interval_of_zero_is_refused_before_anything_starts(project):
    """`every: 0` made each syncer scan without a pause, a CPU kept busy for nothing."""
    from colabkit.errors import ConfigError
    cfg = load_config(start=project)
    with pytest.raises(ConfigError) as ei:
        sync.start(config=cfg, every=0)
    assert str(ei.value) == ("every: 0s must be longer than 0 (with no pause between passes a sync keeps a CPU busy "
                             "scanning); use e.g. 5m, or `colabkit sync flush` to upload now")
    assert sync.status()["running"] is False
