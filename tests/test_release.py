"""`colabkit release` / colabkit.release: every refusal reason, the release path and --dry-run, with a
releaser injected at our own interface (Colab's runtime.unassign() and the OS's shutdown are not available here)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from colabkit import release, sync
from colabkit.cli import main
from colabkit.config import load_config
from colabkit.errors import ReleaseError


class Releaser:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[release.Action] = []
        self.fail = fail

    def __call__(self, action: release.Action) -> None:
        self.calls.append(action)
        if self.fail:
            raise ReleaseError(self.fail)


def make(tmp_path: Path, *, tiers=None, extra=None) -> Path:
    root = tmp_path / "proj"
    e = root / "experiments" / "v01"
    (e / "checkpoints").mkdir(parents=True)
    (e / "logs" / "run1").mkdir(parents=True)
    tiers = tiers if tiers is not None else [
        {"name": "backup", "remote": "local", "path": str(tmp_path / "backup"), "every": "1h"}]
    cfg = {"tiers": tiers, "sync": {"settle": 0.05}, "release": {"command": "shutdown -h +2"}, **(extra or {})}
    (root / "colabkit.yaml").write_text(yaml.safe_dump(cfg))
    for step in (100, 200):
        p = e / "checkpoints" / f"v01_step_{step:08d}.pt"
        b = os.urandom(1000)
        p.write_bytes(b)
        (p.parent / (p.name + ".json")).write_text(json.dumps({"format": 1, "step": step, "size": len(b),
                                                               "sha256": hashlib.sha256(b).hexdigest(),
                                                               "file": p.name}))
    (e / "logs" / "run1" / "train.log").write_text("step 200 loss 0.1\n")
    return root


def cfg(root: Path):
    return load_config(root / "colabkit.yaml")


def failed(d: release.Decision) -> list[str]:
    return [c.name for c in d.checks if not c.ok]


def test_releases_once_everything_is_verified_on_every_tier(tmp_path):
    root = make(tmp_path)
    said: list[str] = []
    r = Releaser()
    d = release.release("v01", config=cfg(root), releaser=r, on_message=said.append)
    assert d.decision == "release" and d.released and not d.forced
    assert [(a.kind, a.command) for a in r.calls] == [("command", ["shutdown", "-h", "+2"])]
    assert said[0] == "Release checks:"
    assert "  ok    flush     flushed backup" in said
    assert ("  ok    tiers     every tier holds a verified copy of the final checkpoint and logs (backup: 3 files, "
            "1.2 KB)") in said
    assert said[-1] == "Releasing: run the release command 'shutdown -h +2'"
    assert (tmp_path / "backup" / "experiments/v01/checkpoints/v01_step_00000200.pt").is_file()
    log = (root / ".colabkit" / "logs" / "release.log").read_text()
    assert "Releasing: run the release command 'shutdown -h +2'" in log


def test_dry_run_decides_without_flushing_or_acting(tmp_path, capsys, monkeypatch):
    root = make(tmp_path)
    monkeypatch.chdir(root)
    assert main(["release", "--dry-run", "-e", "v01"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "Release checks:",
        "  ok    platform  run the release command 'shutdown -h +2'",
        "  FAIL  tiers     backup lacks 3 of 3 (experiments/v01/checkpoints/v01_step_00000200.pt, "
        "experiments/v01/checkpoints/v01_step_00000200.pt.json, experiments/v01/logs/run1/train.log): not verified "
        "on the tier yet (see 'colabkit sync status')",
        "  ok    triggers  no trigger action queued, running or interrupted",
        "  ok    jobs      no other job of this project is active",
        "Dry run: would refuse: run the release command 'shutdown -h +2' (failing: tiers)"]
    assert not (tmp_path / "backup").exists()           # nothing was uploaded
    sync.once(config=cfg(root))
    assert main(["release", "--dry-run", "-e", "v01"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "Dry run: would release: run the release command 'shutdown -h +2'"


def test_failed_flush_refuses(tmp_path):
    (tmp_path / "not-a-folder").write_text("a file where the tier's folder should be")
    root = make(tmp_path, tiers=[{"name": "backup", "remote": "local", "path": str(tmp_path / "not-a-folder")}],
                extra={"sync": {"settle": 0.05, "retry_initial": 0.05, "retry_max": 0.1}})
    r = Releaser()
    d = release.release("v01", config=cfg(root), releaser=r, flush_timeout=1.0)
    assert d.decision == "refuse" and r.calls == []
    assert failed(d) == ["flush", "tiers"]
    assert d.checks[1].detail.startswith("the flush did not finish: backup: ")
    assert d.lines()[-1] == ("NOT RELEASED (flush, tiers failed): did not run the release command 'shutdown -h +2'. "
                             "Fix the above, or pass --release-when-done=force / colabkit release --force to release "
                             "anyway")


def test_no_tier_configured_refuses(tmp_path):
    root = make(tmp_path, tiers=[])
    d = release.release("v01", config=cfg(root), releaser=Releaser())
    assert failed(d) == ["tiers"] and d.checks[-3].detail == (
        "no sync tier is configured: the final checkpoint and logs exist only on this disk, which a release deletes "
        "(configure tiers: in colabkit.yaml)")


def test_queued_trigger_action_refuses_and_force_releases_saying_what_may_be_lost(tmp_path):
    root = make(tmp_path)
    q = root / ".colabkit" / "actions" / "v01"
    q.mkdir(parents=True)
    (q / "cooldown-v01-step200.json").write_text(json.dumps({"format": 1, "id": "cooldown-v01-step200",
                                                             "state": "pending"}))
    (q / "eval-v01-step100.json").write_text(json.dumps({"format": 1, "id": "eval-v01-step100", "state": "done"}))
    r = Releaser()
    d = release.release("v01", config=cfg(root), releaser=r)
    assert d.decision == "refuse" and r.calls == [] and failed(d) == ["triggers"]
    assert d.checks[3].detail == ("1 trigger action(s) still queued, running or interrupted: cooldown-v01-step200 "
                                  "(pending); see 'colabkit triggers list'")
    d = release.release("v01", config=cfg(root), releaser=r, force=True)
    assert d.released and d.forced and len(r.calls) == 1
    assert d.lines()[-2] == ("FORCED although checks failed; what may be lost: triggers: 1 trigger action(s) still "
                             "queued, running or interrupted: cooldown-v01-step200 (pending); see 'colabkit triggers list'")


def test_another_active_job_refuses(tmp_path):
    root = make(tmp_path)
    jobs = root / ".colabkit" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "v02.json").write_text(json.dumps({"format": 1, "experiment": "v02", "run_id": "v02-run",
                                               "state": "running", "pid": os.getpid(), "started": 1.0}))
    r = Releaser()
    d = release.release("v01", config=cfg(root), releaser=r)
    assert failed(d) == ["jobs"] and r.calls == []
    assert d.checks[-1].detail == "another job of this project is active: v02 (run v02-run, running)"
    # the run that asked for the release is not "another job"
    d = release.release("v01", config=cfg(root), releaser=r, exclude_run="v02-run")
    assert d.released


def test_on_colab_it_unassigns_and_elsewhere_needs_a_command(tmp_path, monkeypatch):
    root = make(tmp_path, extra={"release": {}})
    r = Releaser()
    d = release.release("v01", config=cfg(root), releaser=r)
    assert d.decision == "refuse" and failed(d) == ["platform"] and r.calls == []
    assert d.lines()[-1] == "NOT RELEASED: nothing is configured to release this machine (release.command)"
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    d = release.release("v01", config=cfg(root), releaser=r, force=True)
    assert d.released and [a.kind for a in r.calls] == ["colab"]


def test_a_failing_release_command_is_an_error(tmp_path):
    root = make(tmp_path)
    with pytest.raises(ReleaseError) as ei:
        release.release("v01", config=cfg(root), releaser=Releaser(fail="shutdown: Permission denied"))
    assert str(ei.value) == "shutdown: Permission denied"


def test_idle_guard(tmp_path, monkeypatch):
    root = make(tmp_path, extra={"release": {"command": "true", "idle_after": "30m"}})
    sync.once(config=cfg(root))
    r = Releaser()
    d = release.release("v01", config=cfg(root), releaser=r, if_idle=True)
    assert failed(d) == ["idle"] and r.calls == []
    assert d.checks[1].detail.startswith("idle for ") and d.checks[1].detail.endswith(
        ", less than release.idle_after (30m)")
    import time
    later = time.time() + 3600
    monkeypatch.setattr(release.time, "time", lambda: later)
    d = release.release("v01", config=cfg(root), releaser=r, if_idle=True)
    assert d.released and d.checks[1].detail.startswith("idle for 1h")


def test_status_shows_idle_time_and_a_refusal_loudly(tmp_path, capsys, monkeypatch):
    root = make(tmp_path)
    q = root / ".colabkit" / "actions" / "v01"
    q.mkdir(parents=True)
    (q / "a.json").write_text(json.dumps({"id": "a", "state": "pending"}))
    release.release("v01", config=cfg(root), releaser=Releaser())
    monkeypatch.chdir(root)
    assert main(["status"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("release:")
    assert out[i + 1].startswith("  idle: ") and out[i + 1].endswith(" · idle guard off (release.idle_after)")
    assert out[i + 2].startswith("  last release: REFUSED ") and out[i + 2].endswith(
        "ago: NOT RELEASED (triggers failed): did not run the release command 'shutdown -h +2'. Fix the above, or "
        "pass --release-when-done=force / colabkit release --force to release anyway")
    assert out[i + 3] == ("    triggers: 1 trigger action(s) still queued, running or interrupted: a (pending); "
                          "see 'colabkit triggers list'")


def test_watch_idle_releases_once_idle(tmp_path, monkeypatch):
    import threading
    import time
    root = make(tmp_path, extra={"release": {"command": "true", "idle_after": "10m"}})
    sync.once(config=cfg(root))
    later = time.time() + 3600
    monkeypatch.setattr(release.time, "time", lambda: later)
    r = Releaser()
    d = release.watch_idle(config=cfg(root), interval=0.01, releaser=r, stop=threading.Event())
    assert d.released and len(r.calls) == 1
    with pytest.raises(ReleaseError) as ei:
        release.watch_idle(config=load_config(data={}))
    assert str(ei.value) == ("release.idle_after is not set: the idle guard is off. Set it in colabkit.yaml, e.g. "
                             "release: {idle_after: 30m}")


def test_a_running_action_holds_the_machine_and_so_does_one_whose_worker_died(tmp_path):
    from colabkit import triggers
    root = make(tmp_path)
    q = triggers.Queue(cfg(root), "v01")
    assert q.create({"id": "eval-200", "state": "running", "created": 1.0, "rule": "eval"})
    r = Releaser()
    with q.lock("eval-200") as held:
        assert held
        d = release.release("v01", config=cfg(root), releaser=r)
    assert failed(d) == ["triggers"] and r.calls == []
    assert d.checks[3].detail == ("1 trigger action(s) still queued, running or interrupted: eval-200 (running); see "
                                  "'colabkit triggers list'")
    d = release.release("v01", config=cfg(root), releaser=r)   # nobody holds its claim: interrupted, not done
    assert failed(d) == ["triggers"] and r.calls == []
    assert d.checks[3].detail.endswith("eval-200 (interrupted); see 'colabkit triggers list'")
